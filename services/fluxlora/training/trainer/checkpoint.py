"""Checkpoint directories: the LoRA in diffusers format plus the state needed to resume."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.models import FluxTransformer2DModel
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAINING_STATE_NAME = "training_state.pt"
ADAPTER_NAME = "default"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def save_lora(transformer: FluxTransformer2DModel, directory: Path) -> Path:
    """Write the transformer's LoRA as `pytorch_lora_weights.safetensors` (diffusers keys,
    "transformer." prefix). The adapter config travels in the file's metadata, so a loader
    learns alpha as well as rank and applies the trained scale."""
    directory.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME),
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER_NAME].to_dict(),
        safe_serialization=True,
    )
    return directory / LORA_WEIGHTS_NAME


def save_checkpoint(
    transformer: FluxTransformer2DModel, directory: Path, training_state: dict[str, Any]
) -> Path:
    """LoRA weights plus optimizer/scheduler/RNG state; returns the checkpoint directory."""
    save_lora(transformer, directory)
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
