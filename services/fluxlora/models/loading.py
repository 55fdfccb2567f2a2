"""Loading a diffusers-layout directory of any trainable family (models.families): the tiny test
models and the full-size ones alike."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from fluxlora.models.base_layers import freeze_base
from fluxlora.models.base_model import SINGLE_FILE_MARKER
from fluxlora.models.families import Family, family_for_model
from fluxlora.models.single_file import describe_file
from fluxlora.models.single_file_fp8 import keeps_fp8, load_fp8_transformer
from fluxlora.models.single_file_load import load_single_file_transformer

log = logging.getLogger(__name__)

_PRECISIONS = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def pick_device_dtype(
    precision: str = "auto", device: torch.device | str | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device to compute on and the dtype for the base weights.

    The device is `device` when given, else CUDA when present, else the CPU. "auto" precision:
    bf16 on CUDA (fp16 on GPUs without bf16), float32 elsewhere, since half precision on a CPU
    is slow and some ops lack kernels there. An explicit "bf16"/"fp16"/"fp32" is honoured on
    any device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    key = precision.lower()
    if key == "auto":
        if device.type == "cuda":
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32
    if key not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use 'auto', 'bf16', 'fp16' or 'fp32'")
    return device, _PRECISIONS[key]


def _single_file_transformer(model_dir: Path, family: Family, dtype: torch.dtype,
                             base_storage: str) -> torch.nn.Module | None:
    """The transformer of a single-file base (models.base_model's folder names the file), else None;
    an fp8 file whose blocks are to be stored in fp8 keeps its own bytes (models.single_file_fp8)."""
    marker = model_dir / "transformer" / SINGLE_FILE_MARKER
    if not marker.is_file():
        return None
    file = Path(json.loads(marker.read_text())["file"])
    model = describe_file(file)
    if keeps_fp8(model, base_storage):
        return load_fp8_transformer(file, model, family, model_dir, dtype)
    return load_single_file_transformer(file, model, family, model_dir, dtype)


# Processors whose text half is all a pipeline uses, and which transformers builds only with torchvision
# (their image half), which the servers do not install: FLUX.2 [dev] names Mistral-3's PixtralProcessor
# as its tokenizer, and Flux2Pipeline only encodes text with it (its chat template).
_VISION_PROCESSORS = frozenset({"PixtralProcessor"})


def _text_tokenizer_of_processor(model_dir: Path):
    """The tokenizer inside a vision processor the model names as its tokenizer, where the processor itself
    cannot be built here (no torchvision); None where the pipeline's own loading applies."""
    index = json.loads((model_dir / "model_index.json").read_text())
    named = index.get("tokenizer") or [None, None]
    if named[-1] not in _VISION_PROCESSORS or importlib.util.find_spec("torchvision") is not None:
        return None
    from transformers import AutoTokenizer

    log.info("%s: loading the text tokenizer of its %s (its image half needs torchvision)", model_dir, named[-1])
    return AutoTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)


def load_flux_pipeline(
    model_dir: Path,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    cpu_offload: bool = False,
    text_encoders: bool = True,
    base_quantization: str = "none",
    family: Family | None = None,
    base_storage: str | None = None,
):
    """Load a local diffusers-layout directory (or models.base_model's folder for a single-file
    base, whose transformer then loads from its file) of `family` (default: the family detected from the
    model), frozen and in eval mode, on `device`, with that family's diffusers pipeline class.

    Never touches the network. Modules are put in eval mode because models built from a config
    come up in train mode and T5's dropout would make outputs random. cpu_offload keeps each
    model on the CPU until it runs (diffusers' model offload): the full FLUX.1-dev pipeline is
    ~33 GB in bf16 and does not fit a 24 GB GPU at once. text_encoders=False skips loading CLIP
    and T5 (and their tokenizers; whatever encodes text in the family): for callers that have the
    prompt embeddings already.
    base_quantization "fp8"/"int8" stores the transformer blocks' linear weights in 8 bits
    (fluxlora.models.base_layers): FLUX.1-dev's transformer then takes ~12 GB instead of ~24 GB.
    base_storage: how the caller stores the blocks' weights later, where that is not done here (a
    trainer adds its LoRA first, then applies its base_quantization); default base_quantization. With
    "fp8", an fp8 single-file base keeps its blocks' own 8-bit weights instead of being upcast whole.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a diffusers pipeline directory (no model_index.json)"
        )
    family = family or family_for_model(model_dir)
    skipped: dict = {} if text_encoders else dict.fromkeys(family.text_components)
    single = _single_file_transformer(model_dir, family, dtype, base_storage or base_quantization)
    if single is not None:
        skipped["transformer"] = single
    tokenizer = _text_tokenizer_of_processor(model_dir) if text_encoders else None
    if tokenizer is not None:
        skipped["tokenizer"] = None  # not passed in: diffusers would check it against the processor's class
    pipe = family.pipeline_class.from_pretrained(model_dir, dtype=dtype, local_files_only=True, **skipped)
    if tokenizer is not None:
        pipe.register_modules(tokenizer=tokenizer)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            component.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    device = torch.device(device)
    if base_quantization != "none":
        # Quantised layer by layer on the GPU (fast) unless the pipeline is to stay on the CPU.
        where = device if device.type != "cpu" and not cpu_offload else None
        freeze_base(pipe.transformer, base_quantization, dtype, where)
    if cpu_offload and device.type != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    elif device.type != "cpu":  # from_pretrained already left everything on the CPU
        pipe.to(device)
    log.info("loaded %s on %s as %s (transformer blocks: %s%s)", model_dir, device, dtype, base_quantization,
             ", model CPU offload" if cpu_offload and device.type != "cpu" else "")
    return pipe
