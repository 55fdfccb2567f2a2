"""One file, start to finish, in whichever process runs it: the unit of work of the process pool.

A worker reads one file, writes its training image to a staging directory and returns a small
record (hashes, sizes, scores, warnings and, when asked, a thumbnail of a few KB): pixels never
travel between processes, so memory stays bounded by one photo per worker whatever the dataset.
Decisions that need the whole dataset (duplicates, names, near-duplicate groups) are the
caller's, made from the records.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fluxlora.preprocessing.buckets import bucket_label, target_size
from fluxlora.preprocessing.framing import Framing, frame
from fluxlora.preprocessing.images import ImageRejected, decode_image
from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.quality import blur_score, colour_signature, colour_spread, perceptual_hashes

log = logging.getLogger(__name__)

EXTREME_ASPECT = 3.0
# A photo enlarged by up to 5% is not flagged: Lanczos at that ratio loses nothing a person or the
# trainer would notice (a 1000 px crop brought to 1024 is 1.024x).
UPSCALE_TOLERANCE = 1.05
# zlib level 1: on photos 4-5x faster than Pillow's default 6 for ~15% larger files. Encoding is
# most of the per-image cost, and a training image is read once (to cache its latents).
PNG_COMPRESS_LEVEL = 1
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class Task:
    index: int
    key: str
    path: Path
    options: PreprocessOptions
    staging: Path
    thumb_side: int = 0
    """Longest side of the thumbnail to return; 0 for none."""


@dataclass
class Outcome:
    index: int
    key: str
    sha256: str | None
    reason: str | None = None
    """Why the file was rejected; None when it was processed."""
    fields: dict[str, Any] = field(default_factory=dict)
    """ImageEntry fields except stem and file_name, which the caller assigns."""
    staged: str | None = None
    """File name of the training image in the staging directory."""
    thumb: tuple[tuple[int, int], bytes] | None = None
    """(size, raw RGB bytes) of a small copy of the training image, for the contact sheet."""


def process_file(task: Task) -> Outcome:
    """Never raises for a bad file: every problem becomes Outcome.reason."""
    digest = file_sha256(task.path)
    outcome = Outcome(task.index, task.key, digest)
    if digest is None:
        outcome.reason = "cannot read file"
        return outcome
    try:
        _process(task, outcome)
    except ImageRejected as exc:
        outcome.reason = exc.reason
    except MemoryError:
        outcome.reason = "ran out of memory decoding it; downscale it or lower the number of workers"
    except OSError as exc:
        if exc.errno in _OUT_OF_SPACE:
            raise  # the server's disk, not this photo: fail the job rather than reject every file
        log.exception("unexpected failure preprocessing %s", task.key)
        outcome.reason = f"could not be processed ({type(exc).__name__}: {exc}); the server log has details"
    except Exception as exc:  # noqa: BLE001 - one file's surprise must not sink the dataset
        log.exception("unexpected failure preprocessing %s", task.key)
        outcome.reason = f"could not be processed ({type(exc).__name__}: {exc}); the server log has details"
    if outcome.reason is not None and outcome.staged is not None:
        (task.staging / outcome.staged).unlink(missing_ok=True)
        outcome.staged = None
    return outcome


def _process(task: Task, outcome: Outcome) -> None:
    options = task.options
    decoded = decode_image(task.path, background=options.background)
    width, height = decoded.image.size
    min_side = options.min_side or 1
    if min(width, height) < min_side:
        raise ImageRejected(
            f"too small: {width}x{height}; the short side must be at least {min_side} px "
            f"for base size {options.base_size}"
        )
    size = target_size(width, height, options.base_size, options.mode)
    fitted, framing = frame(decoded.image, size, options.mode)
    decoded.image = None  # type: ignore[assignment]  # free the full-size pixels before encoding

    grey = fitted.convert("L")
    phash, dhash = perceptual_hashes(grey)
    score = blur_score(grey)
    spread = colour_spread(fitted)
    warnings = list(decoded.notes)
    flags: list[str] = []
    _check_scale(framing, (width, height), size, warnings, flags)
    _check_aspect(options.mode, (width, height), size, warnings, flags)
    if score < options.blur_threshold:
        flags.append("blurry")
        warnings.append(
            f"blurry or low detail: blur score {score:.1f} is under {options.blur_threshold:g} (variance of "
            "the Laplacian at training size); a sharper photo would train better"
        )

    if spread < options.monochrome_threshold:
        flags.append("monochrome")
        tone = "greyscale" if spread < 1 else "nearly greyscale or toned (one tint, e.g. sepia)"
        warnings.append(
            f"{tone}: colour spread {spread:.1f} is under {options.monochrome_threshold:g}; a LoRA trained on "
            "monochrome photos learns monochrome and its images come out without colour; use colour photos "
            "unless that look is the point"
        )

    outcome.staged = f"{task.index:07d}.png"
    png_sha256 = write_png(fitted, task.staging / outcome.staged)
    outcome.fields = {
        "source_key": task.key,
        "source_format": decoded.source_format,
        "source_mode": decoded.source_mode,
        "original_size": (width, height),
        "crop_box": framing.crop_box,
        "size": size,
        "bucket": bucket_label(size),
        "sha256": outcome.sha256,
        "pixel_sha256": png_sha256,
        "phash": phash,
        "dhash": dhash,
        "colour": colour_signature(fitted),
        "blur_score": score,
        "colour_spread": spread,
        "pad_box": framing.pad_box,
        "pad_color": framing.pad_color,
        "flags": flags,
        "warnings": warnings,
    }
    if task.thumb_side:
        outcome.thumb = _thumbnail(fitted, task.thumb_side)


def _check_scale(
    framing: Framing, original: tuple[int, int], size: tuple[int, int], warnings: list[str], flags: list[str]
) -> None:
    if framing.scale <= UPSCALE_TOLERANCE:
        return
    flags.append("upscaled")
    if framing.pad_box is not None:
        left, top, right, bottom = framing.pad_box
        what = f"whole {original[0]}x{original[1]} to {right - left}x{bottom - top}"
    else:
        left, top, right, bottom = framing.crop_box
        what = f"crop {right - left}x{bottom - top} to {size[0]}x{size[1]}"
    warnings.append(
        f"upscaled {_times(framing.scale)} ({what}): detail will be soft; a higher-resolution photo would train better"
    )


def _times(scale: float) -> str:
    """1.3 -> "1.3x", 1.06 -> "1.06x", 2.0 -> "2x": never a "1.0x" upscale."""
    return f"{scale:.2f}".rstrip("0").rstrip(".") + "x"


def _check_aspect(
    mode: str, original: tuple[int, int], size: tuple[int, int], warnings: list[str], flags: list[str]
) -> None:
    width, height = original
    aspect = max(width, height) / min(width, height)
    if aspect <= EXTREME_ASPECT:
        return
    flags.append("extreme_aspect")
    if mode == "bucket":
        consequence = f"gives a {bucket_label(size)} bucket"
    elif mode == "pad":
        consequence = f"leaves the photo {100 / aspect:.0f}% of the padded square"
    else:
        consequence = f"means the square crop keeps only {100 / aspect:.0f}% of the photo"
    warnings.append(f"extreme aspect ratio {aspect:.1f}:1 {consequence}; crop it closer to the subject if you can")


def _thumbnail(image: Image.Image, side: int) -> tuple[tuple[int, int], bytes]:
    # Box-reduce by the whole factor first (area average: cheap), then resample the small rest.
    factor = max(1, max(image.size) // side)
    small = image.reduce(factor) if factor > 1 else image
    if max(small.size) > side:
        scale = side / max(small.size)
        small = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))),
                             Image.Resampling.BILINEAR)
    return small.size, small.tobytes()


def file_sha256(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def write_png(image: Image.Image, path: Path) -> str:
    """Write `image` as PNG and return the sha256 of the bytes written.

    A fresh info dict and fixed settings keep outputs byte-identical run to run, so the digest
    identifies the pixels: equal pixels give equal bytes, and PNG is lossless. The temp file +
    rename means a crash never leaves a half-written PNG under the final name.
    """
    image.info = {}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    data = buffer.getbuffer()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()
