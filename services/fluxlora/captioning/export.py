"""Kohya-style caption exports: <stem>.png beside <stem>.txt, as a folder or a zip (pure; no store)."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

from fluxlora.captioning.dataset import CAPTION_SUFFIX

# Fixed entry times make one caption version always export to the same bytes (and sha256).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def kohya_folder_name(repeats: int, trigger: str) -> str:
    """kohya's sd-scripts read "<repeats>_<name>" folders: each image is seen `repeats` times per epoch."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 for a kohya folder name, got {repeats}")
    return f"{repeats}_{re.sub(r'[^A-Za-z0-9._-]+', '_', trigger)}"


def write_kohya_zip(images: Mapping[str, Path], captions: Mapping[str, str], out: Path, folder: str = "") -> Path:
    """A zip holding, for every stem, the image (as it is named on disk) and <stem>.txt.

    images and captions must have the same stems; ValueError names the odd ones out.
    """
    _check_pairs(images, captions)
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as archive:
        for stem in sorted(captions):
            image = Path(images[stem])
            # PNGs are already compressed; deflating them again only costs time.
            archive.writestr(_info(f"{prefix}{stem}{image.suffix.lower()}", zipfile.ZIP_STORED), image.read_bytes())
            text = " ".join(captions[stem].split()) + "\n"
            archive.writestr(_info(f"{prefix}{stem}{CAPTION_SUFFIX}", zipfile.ZIP_DEFLATED), text.encode("utf-8"))
    return out


def _info(name: str, compression: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = compression
    info.external_attr = 0o644 << 16
    return info


def _check_pairs(images: Mapping[str, Path], captions: Mapping[str, str]) -> None:
    no_image = sorted(set(captions) - set(images))
    no_caption = sorted(set(images) - set(captions))
    if no_image or no_caption:
        raise ValueError(
            "images and captions do not pair up: "
            + "; ".join(filter(None, [
                f"captions without an image: {', '.join(no_image)}" if no_image else "",
                f"images without a caption: {', '.join(no_caption)}" if no_caption else "",
            ]))
        )
