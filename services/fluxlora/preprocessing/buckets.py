"""Training resolutions ("buckets") for photos of any aspect ratio.

Flux latents are 1/8 of the image and are packed in 2x2 patches, so sides must be multiples of
16; kohya-style bucketing uses 64, which keeps bucket counts small and batches shareable.
"""

from __future__ import annotations

from typing import Literal

BUCKET_STEP = 64
Mode = Literal["bucket", "square", "subject", "pad"]
MODES: tuple[str, ...] = ("bucket", "square", "subject", "pad")
# Modes whose output is base x base whatever the photo's aspect (they differ in what they keep).
SQUARE_MODES: frozenset[str] = frozenset({"square", "subject", "pad"})


def validate_base_size(base_size: int) -> int:
    """Return base_size, or raise ValueError saying what a valid one looks like."""
    if isinstance(base_size, bool) or not isinstance(base_size, int):
        # ValueError, not TypeError: pydantic validators turn only ValueError into field errors.
        raise ValueError(f"base_size must be an integer, got {base_size!r}")  # noqa: TRY004
    if base_size <= 0 or base_size % BUCKET_STEP:
        raise ValueError(
            f"base_size must be a positive multiple of {BUCKET_STEP} "
            f"(512, 768 and 1024 are usual), got {base_size}"
        )
    return base_size


def target_size(width: int, height: int, base_size: int, mode: Mode) -> tuple[int, int]:
    """The (width, height) an image of this size is trained at.

    "square", "subject" and "pad": base x base (framing.py decides what fills it). "bucket": the
    long side becomes base_size and the short side the multiple of 64 nearest to the
    aspect-preserving length (at least 64). Tying the long side to
    base means no bucket holds more than base^2 pixels, so the memory budget measured at the
    square size holds for every bucket.
    """
    validate_base_size(base_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if mode in SQUARE_MODES:
        return base_size, base_size
    if mode != "bucket":
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    long_side, short_side = max(width, height), min(width, height)
    # Integer arithmetic rounding halves up: no float error, no banker's rounding on ties.
    steps = (2 * base_size * short_side + BUCKET_STEP * long_side) // (2 * BUCKET_STEP * long_side)
    short_target = max(BUCKET_STEP, steps * BUCKET_STEP)
    return (base_size, short_target) if width >= height else (short_target, base_size)


def bucket_label(size: tuple[int, int]) -> str:
    """The manifest's histogram key for a bucket, e.g. "1024x768"."""
    return f"{size[0]}x{size[1]}"
