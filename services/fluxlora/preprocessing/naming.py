"""Output names for processed images.

Captions are paired with images by stem (kohya-style `<stem>.png` + `<stem>.txt`), so a photo
keeps its own stem whenever that is safe, and names stay unique even on case-insensitive
filesystems, where a user may download the dataset.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import PurePosixPath

from fluxlora.common.transfers import UPLOADS

MAX_STEM_LENGTH = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(source_key: str) -> str:
    """The file stem of `source_key`, reduced to [A-Za-z0-9._-] (accents folded to ASCII)."""
    name = PurePosixPath(source_key.replace("\\", "/")).name
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE.sub("_", ascii_stem).strip("._-")[:MAX_STEM_LENGTH].rstrip("._-")
    return cleaned or "image"


def folder_name(prefix: str) -> str:
    """How messages name a source prefix: "the uploaded folder" for an upload (the user knows it by
    their own folder's name, which the SDK can put back: fluxlora_client.uploads), else the prefix.
    Files under it are named by their path relative to it, which is the user's own relative path."""
    return "the uploaded folder" if prefix.startswith(UPLOADS) else f"the folder {prefix!r}"


class StemAllocator:
    """Hands out stems no earlier claim shares, ignoring case.

    The first key to claim a stem keeps it; later ones get "-2", "-3", ... skipping any suffixed
    name that is another input's own stem (`all_keys`), so "img-2.jpg" is not renamed because
    of a clash between two "img.jpg". Names depend only on the order of claims, which callers
    keep deterministic by sorting.
    """

    def __init__(self, all_keys: Iterable[str] = ()) -> None:
        self._taken: set[str] = set()
        self._natural = {safe_stem(key).lower() for key in all_keys}

    def claim(self, source_key: str) -> str:
        base = safe_stem(source_key)
        stem, n = base, 1
        while stem.lower() in self._taken:
            n += 1
            stem = f"{base}-{n}"
            while stem.lower() in self._natural:
                n += 1
                stem = f"{base}-{n}"
        self._taken.add(stem.lower())
        return stem


def unique_stems(source_keys: Iterable[str]) -> dict[str, str]:
    """Map each distinct key to its stem, claimed in the order given."""
    keys = list(source_keys)
    allocator = StemAllocator(keys)
    stems: dict[str, str] = {}
    for key in keys:
        if key not in stems:
            stems[key] = allocator.claim(key)
    return stems
