"""Files as both sides count them: content hashes, sizes a person reads, and the upload size limit."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from fluxlora_api.shared.errors import ResourceExhausted

CHUNK = 1 << 20


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_upload_bytes(sizes: Iterable[int], limit: int, where: str) -> int:
    """The total of `sizes` (the objects of one upload), or RESOURCE_EXHAUSTED when it passes `limit`."""
    sizes = list(sizes)
    total = sum(sizes)
    if total > limit:
        files = f"{len(sizes)} file{'s' if len(sizes) != 1 else ''}"
        raise ResourceExhausted(
            f"{where} holds {files} of {human_bytes(total)} ({total} bytes), over the limit of {human_bytes(limit)} "
            f"({limit} bytes, FLUXLORA_MAX_UPLOAD_BYTES): split the photos into smaller uploads or raise "
            "FLUXLORA_MAX_UPLOAD_BYTES"
        )
    return total
