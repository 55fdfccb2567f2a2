"""What the memory planner needs to know about a base model: its transformer's config and the
VAE's downscale factor. Read from config.json files only, so no weights are ever loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxlora.common.models import STORE_SCHEME, is_store_ref
from fluxlora.common.storage import ArtifactStore, validate_prefix
from fluxlora.models.base_model import is_single_file, single_file_model
from fluxlora.models.families import detect_family, planning_family
from fluxlora_api.shared.errors import FailedPrecondition

# black-forest-labs/FLUX.1-dev transformer/config.json (public), so the full-size architecture
# can be planned and benchmarked without the 23 GB download.
FLUX1_DEV_TRANSFORMER: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
FLUX1_VAE_SCALE_FACTOR = 8  # FLUX.1's VAE has four blocks: 2 ** (4 - 1)

_CONFIG_KEYS = ("transformer/config.json", "vae/config.json", "model_index.json")


@dataclass(frozen=True)
class ModelShape:
    transformer: dict[str, Any]  # the family's transformer config
    vae_scale_factor: int = FLUX1_VAE_SCALE_FACTOR
    family: str = "flux1-dev"  # models.families: which transformer class and inputs

    @property
    def latent_channels(self) -> int:
        return self.transformer["in_channels"] // 4  # the pipeline packs 2x2 latent patches

    def cache_key(self) -> dict[str, Any]:
        return {
            "transformer": {k: v for k, v in sorted(self.transformer.items()) if not k.startswith("_")},
            "vae_scale_factor": self.vae_scale_factor,
            "family": self.family,
        }


FLUX1_DEV = ModelShape(FLUX1_DEV_TRANSFORMER)


def shape_from_configs(transformer: dict[str, Any], vae: dict[str, Any] | None,
                       model_index: dict[str, Any] | None = None) -> ModelShape:
    scale = FLUX1_VAE_SCALE_FACTOR
    if vae and vae.get("block_out_channels"):
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    return ModelShape(dict(transformer), scale, detect_family(model_index, transformer) or "flux1-dev")


def read_model_shape(ref: str, store: ArtifactStore | None = None, components: str = "",
                     family: str = "") -> ModelShape:
    """The shape of a base model of any family: a diffusers-layout local directory or store://<prefix>,
    or a single .safetensors transformer file (models.single_file: FLUX.1, Kontext, Chroma, FLUX.2),
    whose shapes come from its header and whose other configs from the `components` folder; no
    weights are read. `family`, the run's named one, decides between families whose files are alike."""
    if is_single_file(ref):
        model = single_file_model(ref, store)
        if not components:
            raise FailedPrecondition(f"base model {ref!r} is a single file: name its components folder "
                                     f"(base_components or FLUXLORA_BASE_COMPONENTS) to plan it")
        transformer, vae, model_index = _read_configs(components, store)
        if transformer is None:
            raise FailedPrecondition(f"the components folder {components!r} of {ref!r} has no {_CONFIG_KEYS[0]}")
        # FLUX.1 [dev] and Kontext files are alike: the run's family says which this is, else the components folder.
        family = model.as_family(family if family in model.families else detect_family(model_index, transformer)).family
        cls = planning_family(family).transformer_class
        transformer = {**transformer, **model.config, "_class_name": cls.__name__}
        return ModelShape(transformer, shape_from_configs(transformer, vae, model_index).vae_scale_factor, family)
    transformer, vae, model_index = _read_configs(ref, store)
    if transformer is None:
        raise FailedPrecondition(
            f"base model {ref!r} has no {_CONFIG_KEYS[0]}: a diffusers-layout FLUX.1 model is needed"
        )
    return shape_from_configs(transformer, vae, model_index)


def _read_configs(ref: str, store: ArtifactStore | None) -> list[dict[str, Any] | None]:
    configs: list[dict[str, Any] | None] = []
    for name in _CONFIG_KEYS:
        if is_store_ref(ref):
            if store is None:
                raise ValueError(f"{ref!r} is a store reference but no store was given")
            key = validate_prefix(ref[len(STORE_SCHEME):]).rstrip("/") + "/" + name
            configs.append(store.get_json(key) if store.exists(key) else None)
        else:
            path = Path(ref).expanduser() / name
            configs.append(json.loads(path.read_text()) if path.is_file() else None)
    return configs
