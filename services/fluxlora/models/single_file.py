"""A base model's transformer as ONE .safetensors file, as ComfyUI users hold FLUX.1 [dev], FLUX.1
Kontext [dev], Chroma and FLUX.2 [dev]/[klein]: Black Forest Labs' key layout
(`double_blocks.0.img_attn.qkv.weight`, ...) or ComfyUI's (the same keys under
`model.diffusion_model.`), in bf16/fp16/fp32 or fp8 (float8_e4m3fn/e5m2).

What the file is (family, shape, dtype) is read from its safetensors header, the JSON at the
start of the file, without loading a weight: family detection and the memory planner need no
more. FLUX.2 has shared modulation layers (`single_stream_modulation.lin`, diffusers'
CHECKPOINT_KEY_NAMES["flux2"]) and [dev] a guidance embedding that [klein] lacks; Chroma has its
`distilled_guidance_layer`; anything else with the keys is FLUX.1. FLUX.1 Kontext's file has
FLUX.1 [dev]'s exact keys and shapes, so its header says flux1-dev and the components folder (or
the run's family) tells the two apart: `families` lists what a header may be. The weights are
loaded with diffusers' own from_single_file, against the transformer config of a diffusers folder
holding the family's other components, so nothing is fetched.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

COMFYUI_PREFIX = "model.diffusion_model."
# A FLUX.1 safetensors header is ~100 KB; anything near this is not a model header.
MAX_HEADER_BYTES = 64 * 1024 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FIX_LAYOUT = ("a FLUX.1 [dev], FLUX.1 Kontext, Chroma or FLUX.2 [dev]/[klein] transformer in the BFL key layout "
               "(double_blocks.0.img_attn.qkv.weight, ...) or the ComfyUI layout (the same keys under "
               "model.diffusion_model.) is needed, such as ComfyUI's flux1-dev.safetensors or BFL's "
               "flux2-dev.safetensors")
# FLUX.2's shared modulation (diffusers' CHECKPOINT_KEY_NAMES["flux2"], without ComfyUI's prefix).
FLUX2_KEY = "single_stream_modulation.lin.weight"
# Families whose transformer files have the same keys and shapes: flux1-kontext-dev.safetensors is
# FLUX.1 [dev]'s layout, so the header names flux1-dev and the components folder decides.
SAME_FILE_FAMILIES: dict[str, tuple[str, ...]] = {
    "flux1-dev": ("flux1-dev", "flux1-kontext"),
    "flux1-kontext": ("flux1-dev", "flux1-kontext"),
}


class SingleFileError(ValueError):
    """The file is not a usable single-file transformer; the message names the file and the fix."""


@dataclass(frozen=True)
class SingleFileModel:
    """What a single-file transformer is, from its header alone."""

    family: str  # models.families name
    layout: str  # "bfl" or "comfyui"
    config: dict[str, Any]  # the diffusers transformer config values its shapes fix
    dtype: str  # the safetensors dtype of most of its parameters ("BF16", "F8_E4M3", ...)
    parameters: int
    weight_bytes: int  # as stored: fp8 counts 1 byte a parameter
    keys: frozenset[str] = field(repr=False, default=frozenset())

    @property
    def is_fp8(self) -> bool:
        return self.dtype.startswith("F8")

    @property
    def families(self) -> tuple[str, ...]:
        """Every family a file with this header may hold (the header alone cannot tell them apart)."""
        return SAME_FILE_FAMILIES.get(self.family, (self.family,))

    def as_family(self, found: str | None) -> SingleFileModel:
        """This file as `found` (a components folder's or run's family) when its header allows
        that family, else as its header says."""
        return replace(self, family=found) if found in self.families and found != self.family else self


def is_single_file(ref: str) -> bool:
    """A base model reference that names one file rather than a diffusers folder."""
    return ref.lower().endswith(".safetensors") or (not ref.startswith("store://") and Path(ref).expanduser().is_file())


def default_components(settings) -> str:
    """The components folder a single-file base uses when the request names none."""
    if settings.base_components:
        return settings.base_components
    return "" if is_single_file(settings.base_model or "") else settings.base_model


def text_model_folder(ref: str, settings) -> str:
    """Where the tokenizers of the base model `ref` are: the model's own folder, or a single file's
    default components folder (a file holds the transformer alone)."""
    return default_components(settings) if ref and is_single_file(ref) else ref


def read_header(source: Path | BinaryIO, where: str = "") -> dict[str, Any]:
    """The tensor entries ({name: {"dtype", "shape", ...}}) of a safetensors file's header."""
    where = where or str(source)
    if isinstance(source, Path):
        try:
            with open(source, "rb") as handle:
                return read_header(handle, where)
        except OSError as exc:
            raise SingleFileError(f"cannot read the base model file {where}: {exc.strerror or exc}") from exc
    raw = source.read(8)
    size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
    body = source.read(size) if 2 <= size <= MAX_HEADER_BYTES else b""
    try:
        header = json.loads(body) if len(body) == size and body[:1] == b"{" else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise SingleFileError(f"the base model file {where} is not a safetensors file (its header is not "
                              f"safetensors JSON): {_FIX_LAYOUT}")
    header.pop("__metadata__", None)
    return header


def header_length(prefix: bytes) -> int:
    """Bytes to read from the start of a file for its whole header, from its first 8 bytes."""
    return 8 + struct.unpack("<Q", prefix[:8])[0] if len(prefix) >= 8 else 8


def describe(header: dict[str, Any], where: str) -> SingleFileModel:
    """Family, key layout, config and dtype of the transformer whose header this is."""
    names = list(header)
    layout = "comfyui" if names and all(n.startswith(COMFYUI_PREFIX) for n in names) else "bfl"
    shapes = {(n[len(COMFYUI_PREFIX):] if layout == "comfyui" else n): entry.get("shape", [])
              for n, entry in header.items()}
    if "double_blocks.0.img_attn.qkv.weight" not in shapes or "img_in.weight" not in shapes:
        hint = " (its keys are diffusers', so it belongs in a diffusers folder's transformer/)" \
            if any(n.startswith("transformer_blocks.") for n in shapes) else ""
        raise SingleFileError(f"the base model file {where} has no FLUX transformer keys{hint}: {_FIX_LAYOUT}")
    if FLUX2_KEY in shapes:
        # FLUX.2 [klein] has no guidance embedding (BFL's use_guidance_embed=False); [dev] is guidance-distilled.
        family = "flux2-dev" if "guidance_in.in_layer.weight" in shapes else "flux2-klein"
    else:
        family = "chroma" if "distilled_guidance_layer.in_proj.weight" in shapes else "flux1-dev"
    try:
        config = _flux2_config(shapes) if family.startswith("flux2") else _config(shapes, family)
    except (KeyError, IndexError, ValueError) as exc:  # a truncated or hand-edited file
        what = f"lacks its {exc} tensor" if isinstance(exc, KeyError) else "has misshapen tensors"
        raise SingleFileError(f"the base model file {where} looks like a {family} transformer but {what}: "
                              f"{_FIX_LAYOUT}") from exc
    dtypes: dict[str, int] = {}
    parameters = weight_bytes = 0
    for entry in header.values():
        count = 1
        for dim in entry.get("shape", []):
            count *= dim
        parameters += count
        weight_bytes += count * DTYPE_BYTES.get(entry.get("dtype", ""), 2)
        dtypes[entry.get("dtype", "")] = dtypes.get(entry.get("dtype", ""), 0) + count
    dtype = max(dtypes, key=lambda d: dtypes[d]) if dtypes else "BF16"
    return SingleFileModel(family, layout, config, dtype, parameters, weight_bytes, frozenset(shapes))


def _blocks(shapes: dict[str, list[int]], prefix: str) -> int:
    indices = {int(n[len(prefix):].split(".", 1)[0]) for n in shapes if n.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _shared_config(shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The config values every family's checkpoint fixes the same way."""
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return {
        "in_channels": in_channels,
        "num_layers": _blocks(shapes, "double_blocks."),
        "num_single_layers": _blocks(shapes, "single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
    }


def _config(shapes: dict[str, list[int]], family: str) -> dict[str, Any]:
    """The diffusers transformer config values that the checkpoint's shapes determine."""
    config = _shared_config(shapes)
    if family == "chroma":
        config.update(approximator_layers=_blocks(shapes, "distilled_guidance_layer.layers."),
                      approximator_hidden_dim=shapes["distilled_guidance_layer.in_proj.weight"][0],
                      approximator_num_channels=shapes["distilled_guidance_layer.in_proj.weight"][1])
    else:
        config.update(pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
                      guidance_embeds="guidance_in.in_layer.weight" in shapes)
    return config


def _flux2_config(shapes: dict[str, list[int]]) -> dict[str, Any]:
    """FLUX.2's: no pooled text; the MLPs are SwiGLU, so img_mlp.0 is twice the hidden MLP width."""
    hidden = shapes["img_in.weight"][0]
    return {
        **_shared_config(shapes),
        "timestep_guidance_channels": shapes["time_in.in_layer.weight"][1],
        "mlp_ratio": shapes["double_blocks.0.img_mlp.0.weight"][0] / 2 / hidden,
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }


def describe_file(path: Path) -> SingleFileModel:
    """describe() of a local file."""
    return describe(read_header(Path(path)), str(path))
