"""Unpacking a caption export (a kohya-style zip) on the caller's machine."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath


def extract_kohya_zip(zip_path: Path, out_dir: Path) -> list[Path]:
    """Unpack an export into out_dir, refusing entries that would land outside it."""
    out_dir = Path(out_dir)
    written = []
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            name = PurePosixPath(info.filename)
            if info.is_dir():
                continue
            if name.is_absolute() or ".." in name.parts:
                raise ValueError(f"export {str(zip_path)!r} holds an unsafe entry {info.filename!r}")
            target = out_dir.joinpath(*name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
            written.append(target)
    return written
