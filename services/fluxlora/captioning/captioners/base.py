"""The captioner interface and the registry that builds one by kind.

Captioners are imported lazily by kind so that asking for the list of kinds, or validating a
request, does not import torch/transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class Captioner(Protocol):
    """Turns images into captions, one per image, in order.

    A captioner loads its model once when built and may be called many times.
    """

    name: str

    def caption(self, images: Sequence[Image.Image]) -> list[str]: ...


@runtime_checkable
class PathCaptioner(Protocol):
    """A captioner that reads the image files itself (by name, say) instead of their pixels.

    generate_captions gives such a captioner the paths; `caption` may then refuse to work.
    """

    name: str

    def caption_paths(self, paths: Sequence[Path]) -> list[str]: ...


# Called as factory(model_dir, task=..., batch_size=..., max_new_tokens=..., device=..., **options).
CaptionerFactory = Callable[..., Captioner]

_BUILTIN: dict[str, str] = {
    "florence2": "fluxlora.captioning.captioners.florence2:Florence2Captioner",
    "blip": "fluxlora.captioning.captioners.blip:BlipCaptioner",
    "import": "fluxlora.captioning.captioners.imported:ImportCaptioner",
}
_registered: dict[str, CaptionerFactory] = {}


def register_captioner(kind: str, factory: CaptionerFactory) -> None:
    """Make `load_captioner(kind, ...)` build captioners with `factory` (replaces a kind)."""
    _registered[_normalize_kind(kind)] = factory


def known_captioners() -> list[str]:
    return sorted(set(_BUILTIN) | set(_registered))


def load_captioner(
    kind: str,
    model_dir: Path | None,
    *,
    task: str = "<CAPTION>",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: str = "auto",
    **options: object,
) -> Captioner:
    """Build a captioner of `kind` from a local model directory.

    options go to the captioner itself (for florence2: num_beams, min_new_tokens, dtype).
    Raises ValueError for an unknown kind or bad settings, FileNotFoundError for a missing or
    incomplete model directory.
    """
    key = _normalize_kind(kind)
    if key not in known_captioners():
        raise ValueError(
            f"unknown captioner kind {kind!r}; known kinds: {', '.join(known_captioners())}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    factory = _registered.get(key) or _import_builtin(_BUILTIN[key])
    return factory(
        Path(model_dir) if model_dir is not None else None,
        task=task,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        **options,
    )


def require_model_files(
    model_dir: Path | None, kind: str, expected: Mapping[str, Sequence[str]]
) -> Path:
    """Check that model_dir exists and holds, for every role in `expected`, one of its files.

    expected maps a role ("weights") to the file names that can fill it, first one preferred.
    The errors name the directory and what was expected, since that is what a person must fix.
    """
    wanted = "; ".join(f"{role}: {' or '.join(names)}" for role, names in expected.items())
    if model_dir is None:
        raise ValueError(f"the {kind} captioner needs a local model directory holding {wanted}")
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"{kind} model directory {str(path)!r} {what}; expected a directory holding {wanted}"
        )
    missing = {
        role: names
        for role, names in expected.items()
        if not any((path / n).is_file() for n in names)
    }
    if missing:
        present = sorted(p.name for p in path.iterdir())
        lacking = "; ".join(f"{role} ({' or '.join(names)})" for role, names in missing.items())
        raise FileNotFoundError(
            f"{kind} model directory {str(path)!r} is incomplete: missing {lacking}. "
            f"It holds: {', '.join(present) or 'nothing'}"
        )
    return path


def _normalize_kind(kind: str) -> str:
    return kind.strip().lower()


def _import_builtin(ref: str) -> CaptionerFactory:
    module_name, attr = ref.split(":")
    return getattr(importlib.import_module(module_name), attr)
