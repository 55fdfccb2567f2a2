"""Checkpoint directories: the LoRA in diffusers format plus the state needed to resume."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.models import FluxTransformer2DModel
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxlora.models.families import family_of_transformer
from fluxlora.training.trainer.kohya import kohya_state_dict

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAINING_STATE_NAME = "training_state.pt"
ADAPTER_NAME = "default"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def kohya_weights_name(export_name: str, step: int) -> str:
    """The kohya-format file of a checkpoint, named for a ComfyUI loras/ folder, where files of
    several runs and steps sit side by side: `<export_name>-step-000750.safetensors`."""
    return f"{export_name}-step-{step:06d}.safetensors"


def save_lora(
    transformer: FluxTransformer2DModel,
    directory: Path,
    metadata: Mapping[str, str] | None = None,
    kohya_name: str | None = None,
) -> Path:
    """Write the transformer's LoRA as `pytorch_lora_weights.safetensors` (diffusers keys,
    "transformer." prefix) and, when kohya_name is given, in kohya's key format as well.

    The adapter config travels in the diffusers file's metadata, so a loader learns alpha as well
    as rank and applies the trained scale; `metadata` (base model, trigger word, spec...) goes
    into both files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lora = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    config = transformer.peft_config[ADAPTER_NAME]
    FluxPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=lora,
        transformer_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    path = directory / LORA_WEIGHTS_NAME
    if metadata:
        _add_metadata(path, metadata)
    if kohya_name:
        # The class decides the key layout; a model built in memory has no _class_name in its config.
        layout = {**transformer.config, "_class_name": type(transformer).__name__}
        kohya = kohya_state_dict(lora, config.lora_alpha, layout)
        kohya_metadata = _kohya_metadata(config, family_of_transformer(transformer))
        save_file(kohya, directory / kohya_name, metadata={**kohya_metadata, **(metadata or {})})
    return path


def _add_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    with safe_open(path, "pt") as handle:
        existing = handle.metadata() or {}
    tensors = load_file(path)
    partial = path.with_name(path.name + ".partial")  # never truncate a file whose tensors are mapped
    save_file(tensors, partial, metadata={**existing, **metadata})
    partial.replace(path)


def _kohya_metadata(config, family) -> dict[str, str]:
    """The sd-scripts fields that tools read to recognise the LoRA's base model and its rank/alpha."""
    return {
        "ss_network_module": family.kohya_network_module,
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(config.lora_alpha),
        "ss_base_model_version": family.kohya_base_model_version,
    }


def save_checkpoint(
    transformer: FluxTransformer2DModel,
    directory: Path,
    training_state: dict[str, Any],
    metadata: Mapping[str, str] | None = None,
    kohya_name: str | None = None,
) -> Path:
    """LoRA weights (both formats) plus optimizer/scheduler/RNG state; returns the directory."""
    save_lora(transformer, directory, metadata, kohya_name)
    torch.save(training_state, directory / TRAINING_STATE_NAME)
    return directory


def load_lora_into(transformer: FluxTransformer2DModel, weights_file: Path) -> None:
    """Put saved LoRA weights back into the transformer's existing adapter (for resuming)."""
    state = {
        key.removeprefix("transformer."): value for key, value in load_file(weights_file).items()
    }
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(
            f"{weights_file} does not match this run's LoRA (unexpected keys such as "
            f"{unexpected[0]}): were rank or target_modules changed?"
        )


def load_training_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / TRAINING_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} holds no {TRAINING_STATE_NAME}: cannot resume from it"
        )
    # Our own file: optimizer state holds plain tensors and Python numbers only.
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The resumable checkpoint with the highest step under out_dir/checkpoints, if any."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), d)
        for d in root.iterdir()
        if (m := _STEP_DIR.match(d.name)) and (d / TRAINING_STATE_NAME).is_file()
    ]
    return max(found)[1] if found else None
