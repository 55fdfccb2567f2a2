"""Local files in, training images and a manifest out: the whole preprocessing step, no I/O
beyond the paths it is given (the service layer downloads and uploads around it).

Every input ends up in exactly one of manifest.images, .rejected or .duplicates, so nothing is
dropped silently. Inputs are handled in source-key order, which makes names, duplicate choices
and output bytes independent of the order the caller lists them in.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from fluxlora.preprocessing.buckets import bucket_label, target_size
from fluxlora.preprocessing.images import ImageRejected, decode_image, fit_to
from fluxlora.preprocessing.manifest import (
    DuplicateFile,
    ImageEntry,
    Manifest,
    PreprocessOptions,
    RejectedFile,
)
from fluxlora.preprocessing.naming import StemAllocator

# Part of the fingerprint: bump when the same inputs and options would give different outputs.
PIPELINE_VERSION = 1

Progress = Callable[[int, int], None]
"""progress(done, total) after each file; raising from it (e.g. on cancel) aborts the run."""

# (warn below, recommended, what to add): rules of thumb from LoRA training practice.
_DATASET_SIZE: dict[str, tuple[int, int, str]] = {
    "concrete": (
        15,
        30,
        (
            "add sharp, unoccluded photos of the subject from varied angles, distances and "
            "backgrounds, in different lighting"
        ),
    ),
    "style": (
        50,
        50,
        "add more images in the style, with varied subjects, compositions and colours",
    ),
}
_EXTREME_ASPECT = 3.0


def preprocess_files(
    files: Sequence[tuple[str, Path]],
    out_dir: Path,
    options: PreprocessOptions | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Validate, de-duplicate and crop `files` ((source_key, local_path) pairs) into `out_dir`.

    Writes `out_dir/<stem>.png` per accepted image and returns the manifest (the caller stores
    it). `out_dir` should be empty: files already there are overwritten or left as they are.
    """
    options = options or PreprocessOptions()
    ordered = _sorted_unique(files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = StemAllocator(key for key, _ in ordered)

    images: list[ImageEntry] = []
    rejected: list[RejectedFile] = []
    duplicates: list[DuplicateFile] = []
    digests: list[tuple[str, str]] = []
    by_bytes: dict[str, ImageEntry] = {}
    by_pixels: dict[str, ImageEntry] = {}

    for done, (key, path) in enumerate(ordered, start=1):
        digest = _file_sha256(path)
        digests.append((key, digest or "unreadable"))
        kept = by_bytes.get(digest) if digest else None
        if kept is not None:
            duplicates.append(_duplicate(key, kept, "file bytes"))
        else:
            try:
                entry = _process(key, path, digest, out_dir, options, stems, by_pixels)
            except ImageRejected as exc:
                rejected.append(RejectedFile(source_key=key, reason=exc.reason))
            else:
                if isinstance(entry, DuplicateFile):
                    duplicates.append(entry)
                else:
                    images.append(entry)
                    by_bytes[entry.sha256] = entry
                    by_pixels[entry.pixel_sha256] = entry
        if progress is not None:
            progress(done, len(ordered))

    return Manifest(
        dataset_fingerprint=_fingerprint(digests, options),
        options=options,
        image_count=len(images),
        rejected_count=len(rejected),
        duplicate_count=len(duplicates),
        buckets=dict(sorted(Counter(entry.bucket for entry in images).items())),
        warnings=dataset_warnings(images, rejected, duplicates, options),
        images=images,
        rejected=rejected,
        duplicates=duplicates,
    )


def dataset_fingerprint(files: Sequence[tuple[str, Path]], options: PreprocessOptions) -> str:
    """A short id ("ds-" + 12 hex) equal for the same files (keys and bytes) and options.

    Keys count as well as bytes because output names derive from them; order does not count.
    The same value is in Manifest.dataset_fingerprint, so a service can look up a finished
    dataset before doing the work again.
    """
    ordered = _sorted_unique(files)
    return _fingerprint(
        [(key, _file_sha256(path) or "unreadable") for key, path in ordered], options
    )


def dataset_warnings(
    images: Sequence[ImageEntry],
    rejected: Sequence[RejectedFile],
    duplicates: Sequence[DuplicateFile],
    options: PreprocessOptions,
) -> list[str]:
    """Dataset-level advice for the user; per-image problems stay on the images."""
    warnings: list[str] = []
    count = len(images)
    warn_below, recommended, what_to_add = _DATASET_SIZE[options.lora_type]
    if count == 0:
        warnings.append(f"No usable images: nothing to train on. {what_to_add.capitalize()}.")
    elif count < warn_below:
        warnings.append(
            f"Only {count} usable image{'s' if count != 1 else ''} for a {options.lora_type} "
            f"LoRA; about {recommended}{'+' if options.lora_type == 'style' else ''} work best. "
            f"{what_to_add.capitalize()}."
        )
    if rejected:
        warnings.append(f"{len(rejected)} file(s) rejected; see `rejected` for the reasons.")
    if duplicates:
        warnings.append(f"{len(duplicates)} exact duplicate(s) skipped; see `duplicates`.")
    upscaled = sum(1 for entry in images if _was_upscaled(entry))
    if upscaled and upscaled * 2 >= count:
        warnings.append(
            f"{upscaled} of {count} images had to be upscaled to reach {options.base_size} px; "
            "higher-resolution photos, or a smaller base size, would train sharper."
        )
    return warnings


def _process(
    key: str,
    path: Path,
    digest: str | None,
    out_dir: Path,
    options: PreprocessOptions,
    stems: StemAllocator,
    by_pixels: dict[str, ImageEntry],
) -> ImageEntry | DuplicateFile:
    if digest is None:
        raise ImageRejected("cannot read file")
    decoded = decode_image(path, background=options.background)
    image = decoded.image
    width, height = image.size
    min_side = options.min_side or 1
    if min(width, height) < min_side:
        raise ImageRejected(
            f"too small: {width}x{height}; the short side must be at least {min_side} px "
            f"for base size {options.base_size}"
        )

    pixel_digest = _pixel_sha256(image)
    kept = by_pixels.get(pixel_digest)
    if kept is not None:
        return _duplicate(key, kept, "pixels")

    size = target_size(width, height, options.base_size, options.mode)
    fitted, crop_box = fit_to(image, size)
    stem = stems.claim(key)
    file_name = f"{stem}.png"
    _write_png(fitted, out_dir / file_name)

    warnings = list(decoded.notes)
    crop_w, crop_h = crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]
    scale = max(size[0] / crop_w, size[1] / crop_h)
    if scale > 1:
        warnings.append(
            f"upscaled {scale:.1f}x (crop {crop_w}x{crop_h} to {size[0]}x{size[1]}): detail will "
            "be soft; a higher-resolution photo would train better"
        )
    aspect = max(width, height) / min(width, height)
    if options.mode == "bucket" and aspect > _EXTREME_ASPECT:
        warnings.append(
            f"extreme aspect ratio {aspect:.1f}:1 gives a {bucket_label(size)} bucket; "
            "crop it closer to the subject if you can"
        )
    return ImageEntry(
        stem=stem,
        file_name=file_name,
        source_key=key,
        source_format=decoded.source_format,
        source_mode=decoded.source_mode,
        original_size=(width, height),
        crop_box=crop_box,
        size=size,
        bucket=bucket_label(size),
        sha256=digest,
        pixel_sha256=pixel_digest,
        warnings=warnings,
    )


def _sorted_unique(files: Sequence[tuple[str, Path]]) -> list[tuple[str, Path]]:
    ordered = sorted(((str(key), Path(path)) for key, path in files), key=lambda kv: kv[0])
    for (a, _), (b, _) in itertools.pairwise(ordered):
        if a == b:
            raise ValueError(f"source key {a!r} given twice")
    return ordered


def _duplicate(key: str, kept: ImageEntry, match: str) -> DuplicateFile:
    return DuplicateFile(source_key=key, duplicate_of=kept.source_key, stem=kept.stem, match=match)


def _was_upscaled(entry: ImageEntry) -> bool:
    left, top, right, bottom = entry.crop_box
    return entry.size[0] > right - left or entry.size[1] > bottom - top


def _file_sha256(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def _pixel_sha256(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _fingerprint(digests: Sequence[tuple[str, str]], options: PreprocessOptions) -> str:
    payload = json.dumps(
        {
            "pipeline": PIPELINE_VERSION,
            "options": options.model_dump(mode="json"),
            "files": sorted(digests),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return "ds-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def _write_png(image: Image.Image, path: Path) -> None:
    # A fresh info dict and fixed settings keep outputs byte-identical run to run; the temp
    # file + rename means a crash never leaves a half-written PNG under the final name.
    image.info = {}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
