"""Bringing a decoded photo to its training size: what to keep and how it fills the frame.

- "bucket" and "square": the largest window of the target's aspect, centred.
- "subject": a square window placed on the salient region (saliency.py), not the centre.
- "pad": nothing is cut; the whole photo is scaled to fit the square and the rest is filled
  with the photo's own background colour (the median of its border), so the model does not
  learn bars of a colour the photos never show.

Always Lanczos; never an upscale the caller is not told about (Framing.scale says how much).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from fluxlora.preprocessing.saliency import analysis_thumbnail, best_offset, border_colour, saliency_map

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Framing:
    crop_box: Box
    """Part of the source that was kept, in its pixels (the whole frame when padding)."""
    scale: float
    """Output pixels per source pixel along the larger factor; above 1 means upscaled."""
    pad_box: Box | None = None
    """Where the photo sits in the output when padded."""
    pad_color: tuple[int, int, int] | None = None


def centre_crop_box(width: int, height: int, size: tuple[int, int]) -> Box:
    """The largest centred window of `size`'s aspect in a width x height frame (whole pixels)."""
    crop_w, crop_h = _window(width, height, size)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def subject_crop_box(image: Image.Image, size: tuple[int, int]) -> Box:
    """Like centre_crop_box, with the window slid along its free axis onto the salient region."""
    width, height = image.size
    crop_w, crop_h = _window(width, height, size)
    if (crop_w, crop_h) == (width, height):
        return 0, 0, width, height
    saliency = saliency_map(analysis_thumbnail(image))
    if crop_w < width:
        left = best_offset(saliency.sum(axis=0), width, crop_w)
        return left, 0, left + crop_w, height
    top = best_offset(saliency.sum(axis=1), height, crop_h)
    return 0, top, width, top + crop_h


def crop_resize(image: Image.Image, size: tuple[int, int], box: Box) -> Image.Image:
    # reducing_gap lets Pillow box-reduce a 24 MP photo first: several times faster, and the
    # final Lanczos pass still sees 3x the target resolution, so the result is indistinguishable.
    return image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def frame(image: Image.Image, size: tuple[int, int], mode: str) -> tuple[Image.Image, Framing]:
    """`image` brought to exactly `size` the way `mode` says, and what was done."""
    width, height = image.size
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"target size must be positive, got {size[0]}x{size[1]}")
    if mode == "pad":
        return _pad(image, size)
    box = subject_crop_box(image, size) if mode == "subject" else centre_crop_box(width, height, size)
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    scale = max(size[0] / crop_w, size[1] / crop_h)
    return crop_resize(image, size, box), Framing(crop_box=box, scale=scale)


def _pad(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, Framing]:
    width, height = image.size
    target_w, target_h = size
    scale = min(target_w / width, target_h / height)
    fit_w = min(target_w, max(1, round(width * scale)))
    fit_h = min(target_h, max(1, round(height * scale)))
    left, top = (target_w - fit_w) // 2, (target_h - fit_h) // 2
    colour = border_colour(analysis_thumbnail(image))
    canvas = Image.new("RGB", size, colour)
    canvas.paste(crop_resize(image, (fit_w, fit_h), (0, 0, width, height)), (left, top))
    return canvas, Framing(
        crop_box=(0, 0, width, height),
        scale=max(fit_w / width, fit_h / height),
        pad_box=(left, top, left + fit_w, top + fit_h),
        pad_color=colour,
    )


def _window(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    target_w, target_h = size
    # Compare aspects by cross-multiplying: exact in integers.
    if width * target_h > height * target_w:
        return max(1, round(height * target_w / target_h)), height
    return width, max(1, round(width * target_h / target_w))
