"""Before/after pairs for editing LoRAs (FLUX.1 Kontext): which uploaded files are control (before)
images, and the control half of each kept pair cropped exactly as its target was.

A control image is named either `<name>_control.<ext>` beside its target `<name>.<ext>`, or
`<folder>/control/<name>.<ext>` for the target `<folder>/<name>.<ext>` (a second folder with the
same stems: the layout ai-toolkit's control_path and musubi-tuner's control_directory read).
An upload with no control image at all is an ordinary dataset and is left alone.

The targets go through the usual pipeline (checks, duplicates, crop); the control of each kept
target is then given the target's crop box, size and padding, so the two halves line up pixel
for pixel. A pair with a missing half, halves of different aspect ratios or a control equal to
its target is rejected with a reason for each file; the other pairs are kept.

A control of the same aspect but another resolution is brought to its target's training size too,
not kept at a size of its own: FLUX.1 Kontext's position ids are latent-pixel coordinates, so only
at the same size does each control token sit where its target token does; ai-toolkit and
musubi-tuner train this way by default; and our samples, grid and generate hand the pipeline the
control at the output's size, which is what training then matches (docs/architecture.md, "Editing
pairs"). A control smaller than its target is therefore upscaled, and the pair is warned about.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from fluxlora.preprocessing.framing import crop_resize
from fluxlora.preprocessing.images import ImageRejected, decode_image
from fluxlora.preprocessing.manifest import ImageEntry, Manifest, RejectedFile
from fluxlora.preprocessing.worker import UPSCALE_TOLERANCE, file_sha256, write_png

CONTROL_SUFFIX = "_control"
CONTROL_FOLDER = "control"
# Where the control halves are written, beside the training images (and stored: keys.dataset_controls).
CONTROL_DIR = "control"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
# Halves whose aspect ratios differ by more than this are not the same framing.
_ASPECT_TOLERANCE = 0.01
PAIR_REFUSED = "pair refused: "  # the start of the reason given to both halves of a refused pair


@dataclass
class PairedFiles:
    targets: list[tuple[str, Path]]  # what the pipeline processes (targets and non-image files)
    controls: dict[str, tuple[str, Path]] = field(default_factory=dict)  # target key -> (control key, path)
    rejected: list[RejectedFile] = field(default_factory=list)
    paired: bool = False  # the upload names control images: an editing dataset


def split_pairs(files: Sequence[tuple[str, Path]]) -> PairedFiles:
    """Targets and their controls among `files` ((source key, path)); an upload without control
    images comes back as all targets."""
    controls = {key: path for key, path in files if _target_of_control(key) is not None}
    if not controls:
        return PairedFiles(list(files))
    by_folder_stem: dict[tuple[str, str], list[str]] = {}
    for key, _path in files:
        if key not in controls and _is_image(key):
            by_folder_stem.setdefault(_folder_stem(key), []).append(key)
    result = PairedFiles([(key, path) for key, path in files if key not in controls], paired=True)
    matched: dict[str, str] = {}
    for key, path in sorted(controls.items()):
        wanted = _target_of_control(key)
        candidates = by_folder_stem.get(wanted, [])
        if len(candidates) != 1 or candidates[0] in matched:
            folder, stem = wanted
            what = "no target image" if not candidates else f"{len(candidates)} target images"
            result.rejected.append(RejectedFile(
                source_key=key,
                reason=f"control image without its target: {what} named {_join(folder, stem)}.<ext>; "
                       "upload the after image beside it (same stem) or rename the control",
            ))
            continue
        matched[candidates[0]] = key
        result.controls[candidates[0]] = (key, path)
    kept = []
    for key, path in result.targets:
        if _is_image(key) and key not in result.controls:
            folder, stem = _folder_stem(key)
            result.rejected.append(RejectedFile(
                source_key=key,
                reason=f"missing its control image: add {_join(folder, stem + CONTROL_SUFFIX)}.<ext> beside it or "
                       f"{_join(_join(folder, CONTROL_FOLDER), stem)}.<ext> (the before image of this edit)",
            ))
            continue
        kept.append((key, path))
    result.targets = kept
    return result


def attach_controls(manifest: Manifest, pairs: PairedFiles, out_dir: Path) -> Manifest:
    """`manifest` (of the targets, images in out_dir) with each kept target's control cropped
    alike into out_dir/control/<stem>.png, the rejected pairs moved to manifest.rejected and the
    control files counted; the dataset id covers the control images' bytes too."""
    control_dir = Path(out_dir) / CONTROL_DIR
    control_dir.mkdir(parents=True, exist_ok=True)
    images: list[ImageEntry] = []
    rejected = list(manifest.rejected) + list(pairs.rejected)
    kept_targets = set()
    for entry in manifest.images:
        control_key, control_path = pairs.controls[entry.source_key]
        try:
            control, warning = _framed_like(entry, control_key, control_path, manifest.options.background)
            if _same_pixels(control, Path(out_dir) / entry.file_name):
                raise ImageRejected(f"control image {control_key} equals its target after cropping: the pair shows "
                                    "no edit to learn; upload the before image as the control")
        except ImageRejected as exc:
            (Path(out_dir) / entry.file_name).unlink(missing_ok=True)
            rejected.append(RejectedFile(source_key=entry.source_key, reason=f"{PAIR_REFUSED}{exc}"))
            rejected.append(RejectedFile(source_key=control_key, reason=f"{PAIR_REFUSED}{exc}"))
            continue
        write_png(control, control_dir / entry.file_name)
        images.append(entry.model_copy(update={
            "control_source_key": control_key, "control_file_name": f"{CONTROL_DIR}/{entry.file_name}",
            "flags": [*entry.flags, "control_upscaled"] if warning else entry.flags,
            "warnings": [*entry.warnings, warning] if warning else entry.warnings,
        }))
        kept_targets.add(entry.source_key)
    for target_key, (control_key, _) in pairs.controls.items():
        in_rejected = any(r.source_key == target_key for r in rejected)
        if target_key not in kept_targets and not in_rejected:  # its target was a duplicate
            rejected.append(RejectedFile(source_key=control_key,
                                         reason=f"control image of {target_key}, which was not kept (a duplicate)"))
        elif in_rejected and not any(r.source_key == control_key for r in rejected):
            rejected.append(RejectedFile(source_key=control_key,
                                         reason=f"control image of {target_key}, which was rejected (see that file)"))
    rejected.sort(key=lambda r: r.source_key)
    digest = hashlib.sha256(manifest.dataset_fingerprint.encode())
    for target_key, (control_key, path) in sorted(pairs.controls.items()):
        digest.update(f"\0{target_key}\0{control_key}\0{file_sha256(path) or 'unreadable'}".encode())
    for entry in pairs.rejected:
        digest.update(f"\0refused\0{entry.source_key}".encode())
    buckets: dict[str, int] = {}
    for entry in images:
        buckets[entry.bucket] = buckets.get(entry.bucket, 0) + 1
    return manifest.model_copy(update={
        "dataset_fingerprint": "ds-" + digest.hexdigest()[:12],
        "paired": True,
        "file_count": manifest.file_count + len(pairs.controls) + len(pairs.rejected),
        "images": images,
        "image_count": len(images),
        "rejected": rejected,
        "rejected_count": len(rejected),
        "flagged_count": sum(1 for e in images if e.flags),
        "buckets": dict(sorted(buckets.items())),
    })


def _framed_like(entry: ImageEntry, key: str, path: Path,
                 background: tuple[int, int, int]) -> tuple[Image.Image, str | None]:
    """The control image brought to the target's training image by the target's own framing, and a
    warning when that upscales a control of lower resolution than its target."""
    try:
        decoded = decode_image(path, background=background)
    except ImageRejected as exc:
        raise ImageRejected(f"control image {key} is unusable: {exc}") from exc
    image = decoded.image
    (width, height), (target_w, target_h) = image.size, entry.original_size
    if abs(width * target_h - height * target_w) > _ASPECT_TOLERANCE * height * target_w:
        raise ImageRejected(
            f"control image {key} is {width}x{height} and its target {entry.source_key} is {target_w}x{target_h}: "
            "the halves of a pair must show the same framing (same size, or at least the same aspect ratio)"
        )
    scale_x, scale_y = width / target_w, height / target_h
    left, top, right, bottom = entry.crop_box
    box = (round(left * scale_x), round(top * scale_y), round(right * scale_x), round(bottom * scale_y))
    placed = entry.size if entry.pad_box is None else (entry.pad_box[2] - entry.pad_box[0],
                                                      entry.pad_box[3] - entry.pad_box[1])
    upscale = max(placed[0] / max(1, box[2] - box[0]), placed[1] / max(1, box[3] - box[1]))
    warning = None
    if upscale > UPSCALE_TOLERANCE and target_w / width > UPSCALE_TOLERANCE:
        warning = (f"control image {key} ({width}x{height}) has a lower resolution than its target "
                   f"({target_w}x{target_h}) and is upscaled {upscale:.2f}x to the target's {entry.size[0]}x"
                   f"{entry.size[1]}: the edit's input will be soft; upload the before image at the after "
                   "image's resolution")
    if entry.pad_box is None:
        return crop_resize(image, entry.size, box), warning
    canvas = Image.new("RGB", entry.size, entry.pad_color or (255, 255, 255))
    canvas.paste(crop_resize(image, placed, box), entry.pad_box[:2])
    return canvas, warning


def _same_pixels(control: Image.Image, target_png: Path) -> bool:
    with Image.open(target_png) as target:
        return target.convert("RGB").tobytes() == control.convert("RGB").tobytes()


def _target_of_control(key: str) -> tuple[str, str] | None:
    """(folder, stem) of the target a control image's key names; None for a key that is no control."""
    if not _is_image(key):
        return None
    path = PurePosixPath(key)
    if path.stem.endswith(CONTROL_SUFFIX) and len(path.stem) > len(CONTROL_SUFFIX):
        return str(path.parent), path.stem[: -len(CONTROL_SUFFIX)]
    if path.parent.name == CONTROL_FOLDER:
        return str(path.parent.parent), path.stem
    return None


def _folder_stem(key: str) -> tuple[str, str]:
    path = PurePosixPath(key)
    return str(path.parent), path.stem


def _is_image(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in _IMAGE_SUFFIXES


def _join(folder: str, name: str) -> str:
    return name if folder in ("", ".") else f"{folder}/{name}"
