"""The model families a run can train on, and which one a base model directory holds.

A family is named by TrainSpec.family or found from the model itself: model_index.json's pipeline
class, else the transformer config's class.
"""

from __future__ import annotations

import json
from pathlib import Path

from fluxlora.models.families.base import Family, PromptEncoding
from fluxlora.models.families.chroma import Chroma
from fluxlora.models.families.flux2 import Flux2, Flux2Klein
from fluxlora.models.families.kontext import Kontext

FLUX1_DEV = Family()
CHROMA = Chroma()
FLUX2_DEV = Flux2()
FLUX2_KLEIN = Flux2Klein()
KONTEXT = Kontext()
FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX1_DEV, CHROMA, FLUX2_DEV, FLUX2_KLEIN, KONTEXT)}
FAMILY_NAMES = tuple(FAMILIES)

# diffusers class names -> family. FluxPipeline covers FLUX.1 [dev], [schnell] and the tiny model.
_BY_PIPELINE = {
    "FluxPipeline": "flux1-dev",
    "ChromaPipeline": "chroma",
    "FluxKontextPipeline": "flux1-kontext",
    "Flux2Pipeline": "flux2-dev",
    "Flux2KleinPipeline": "flux2-klein",
}
# Kontext shares FLUX.1's transformer and both FLUX.2s share one class: the pipeline class decides.
_BY_TRANSFORMER = {
    "FluxTransformer2DModel": "flux1-dev",
    "ChromaTransformer2DModel": "chroma",
    "Flux2Transformer2DModel": "flux2-dev",
}

__all__ = ["CHROMA", "FAMILIES", "FAMILY_NAMES", "FLUX1_DEV", "FLUX2_DEV", "FLUX2_KLEIN", "KONTEXT", "Family",
           "PromptEncoding", "detect_family", "family_of", "family_of_transformer", "agreed_family", "family_for_model",
           "get_family", "planning_family"]


def get_family(name: str) -> Family:
    """The trainable family called `name`; ValueError naming the choices otherwise."""
    if name in FAMILIES:
        return FAMILIES[name]
    raise ValueError(f"unknown model family {name!r}: use one of {', '.join(FAMILY_NAMES)}")


def planning_family(name: str) -> Family:
    """The family object the memory planner uses for `name`: every family trains, so get_family's."""
    # Kontext's control-image tokens are in the planner's fake step (Family.takes_control_image).
    return get_family(name)


def detect_family(model_index: dict | None, transformer_config: dict | None) -> str | None:
    """The family named by a model's model_index.json or transformer config (either may be None)."""
    name = _BY_PIPELINE.get((model_index or {}).get("_class_name", ""))
    return name or _BY_TRANSFORMER.get((transformer_config or {}).get("_class_name", ""))


def detect_family_in(model_dir: Path) -> str | None:
    """detect_family on a diffusers-layout directory."""
    configs = [_read_json(Path(model_dir) / name) for name in ("model_index.json", "transformer/config.json")]
    return detect_family(*configs)


def family_for_model(model_dir: Path, named: str = "") -> Family:
    """The family to train `model_dir` as: `named` when given (it must agree with the model),
    else the detected one. ValueError naming the folder and the fix when they disagree or when the
    model's family is unknown."""
    return get_family(agreed_family(detect_family_in(model_dir), named, str(model_dir)))


def agreed_family(found: str | None, named: str, where: str) -> str:
    """The family name to use for a model at `where` whose files say `found` (None: they do not
    say) when the run names `named` ("" for none); ValueError naming the model and the fix."""
    if named:
        if named not in FAMILY_NAMES:
            raise ValueError(f"unknown model family {named!r}: use one of {', '.join(FAMILY_NAMES)}")
        if found is not None and found != named:
            raise ValueError(f"the base model {where} is a {found} model, not {named}: set family to "
                             f"{found!r} (or leave it unset to detect it), or choose a {named} model")
        return named
    if found is None:
        raise ValueError(f"cannot tell the model family of {where}: its model_index.json names no known "
                         f"pipeline class; set family to one of {', '.join(FAMILY_NAMES)}")
    return found


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def family_of_transformer(transformer) -> Family:
    """The family whose transformer class (or a base class of it) `transformer` is; peft wraps the module, not
    its class, and a compiled one keeps it as _orig_mod. FLUX.2's two share one class: [dev]'s object, which
    differs from [klein]'s only in text encoding and guidance. FLUX.1 for any other class."""
    for cls in type(getattr(transformer, "_orig_mod", transformer)).__mro__:
        name = _BY_TRANSFORMER.get(cls.__name__)
        if name is not None:
            return planning_family(name)
    return FLUX1_DEV


def family_of(pipe) -> Family:
    """The family of a loaded pipeline (by its class: FluxPipeline subclasses count as FLUX.1)."""
    for cls in type(pipe).__mro__:
        name = _BY_PIPELINE.get(cls.__name__)
        if name is not None:
            return get_family(name)
    raise ValueError(f"{type(pipe).__name__} is not a pipeline of a known model family")
