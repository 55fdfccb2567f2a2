"""The encoded dataset (VAE latents, T5 + CLIP text embeddings) saved as one safetensors file, so a
second run on the same images, captions, model and resolution (a resume, a new learning rate, a
restarted worker) neither encodes again nor loads the text encoders at all: on FLUX.1 that skips
loading ~10 GB of T5-XXL and CLIP and a minute or more of encoding.

The key is a digest of everything the tensors depend on: each image's bytes and caption, the base
model's identity, the resolution, the T5 length, the extra (sample) prompts and this format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fluxlora.training.trainer.data import CachedDataset, Pair, Sample, TextEmbedding
from fluxlora_api.shared.files import sha256_file

FORMAT_VERSION = 1
_META_KEY = "fluxlora.encoding_cache"


def encoding_key(pairs: Sequence[Pair], model_identity: str, resolution: int, max_sequence_length: int,
                 extra_prompts: Sequence[str]) -> str:
    """A digest naming the encoded tensors of `pairs`; equal keys mean interchangeable caches."""
    digest = hashlib.sha256()
    header = {"format": FORMAT_VERSION, "model": model_identity, "resolution": resolution,
              "max_sequence_length": max_sequence_length, "prompts": list(extra_prompts)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for pair in pairs:
        digest.update(pair.image.name.encode() + b"\0")
        digest.update(sha256_file(pair.image).encode())
        digest.update(pair.caption.encode() + b"\0")
        if pair.control is not None:  # editing pairs: the control image's bytes too
            digest.update(b"control\0" + sha256_file(pair.control).encode())
    return digest.hexdigest()[:40]


def save_encodings(cached: CachedDataset, path: Path) -> Path:
    """Write `cached` to `path` (atomically: a reader never sees half a file)."""
    tensors: dict[str, torch.Tensor] = {"text_ids": cached.text_ids}
    texts: dict[str, TextEmbedding] = {"": cached.empty_text, **cached.prompts}
    for sample in cached.samples:
        texts.setdefault(sample.pair.caption, sample.text)
    text_names = {text: f"text{i}" for i, text in enumerate(texts)}
    for text, name in text_names.items():
        tensors[f"{name}.embeds"] = texts[text].prompt_embeds.contiguous()
        tensors[f"{name}.pooled"] = texts[text].pooled.contiguous()
        if texts[text].mask is not None:  # families that attend with a text mask (Chroma)
            tensors[f"{name}.mask"] = texts[text].mask.contiguous()
    for i, sample in enumerate(cached.samples):
        tensors[f"latents{i}"] = sample.latents.contiguous()
        if sample.control_latents is not None:
            tensors[f"control{i}"] = sample.control_latents.contiguous()
    layout = {
        "format": FORMAT_VERSION,
        "texts": list(text_names),
        "samples": [_sample_layout(s) for s in cached.samples],
        "prompts": list(cached.prompts),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata={_META_KEY: json.dumps(layout)})
    partial.replace(path)
    return path


def _sample_layout(sample: Sample) -> dict[str, str]:
    layout = {"image": sample.pair.image.name, "caption": sample.pair.caption}
    if sample.pair.control is not None:  # control/<name>, relative to the dataset folder
        layout["control"] = sample.pair.control.relative_to(sample.pair.image.parent).as_posix()
    return layout


def _control_path(dataset_dir: Path, layout: dict[str, str]) -> Path | None:
    return dataset_dir / layout["control"] if "control" in layout else None


def load_encodings(path: Path, dataset_dir: Path) -> CachedDataset:
    """The CachedDataset saved at `path`, its images named in `dataset_dir`. ValueError when the
    file is not such a cache (or another format version)."""
    try:
        with safe_open(str(path), "pt") as handle:
            raw = (handle.metadata() or {}).get(_META_KEY)
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a safetensors file: {exc}") from exc
    if raw is None:
        raise ValueError(f"{path} is not a fluxlora encoding cache")
    layout = json.loads(raw)
    if layout.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is an encoding cache of format {layout.get('format')}, not {FORMAT_VERSION}")
    tensors = load_file(str(path))
    texts = {text: TextEmbedding(tensors[f"text{i}.embeds"], tensors[f"text{i}.pooled"],
                                 tensors.get(f"text{i}.mask"))
             for i, text in enumerate(layout["texts"])}
    dataset_dir = Path(dataset_dir)
    samples = [Sample(Pair(dataset_dir / s["image"], s["caption"], _control_path(dataset_dir, s)),
                      tensors[f"latents{i}"], texts[s["caption"]], tensors.get(f"control{i}"))
               for i, s in enumerate(layout["samples"])]
    return CachedDataset(samples=samples, empty_text=texts[""], text_ids=tensors["text_ids"],
                         prompts={p: texts[p] for p in layout["prompts"]})
