"""Bucket and framing maths, property-tested: whatever the photo's size, every output side is a
multiple of 64, the area stays within bounds and the aspect error is bounded."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fluxlora.preprocessing.buckets import BUCKET_STEP, MODES, target_size
from fluxlora.preprocessing.framing import frame

sides = st.integers(min_value=1, max_value=20_000)
bases = st.integers(min_value=1, max_value=32).map(lambda k: k * BUCKET_STEP)


@given(width=sides, height=sides, base=bases)
def test_bucket_sides_are_multiples_of_64_and_the_long_one_is_base(width, height, base):
    w, h = target_size(width, height, base, "bucket")
    assert w % BUCKET_STEP == 0 and h % BUCKET_STEP == 0
    assert max(w, h) == base


@given(width=sides, height=sides, base=bases)
def test_bucket_area_stays_within_bounds(width, height, base):
    w, h = target_size(width, height, base, "bucket")
    assert BUCKET_STEP * base <= w * h <= base * base


@given(width=sides, height=sides, base=bases)
def test_bucket_aspect_error_is_at_most_half_a_step(width, height, base):
    w, h = target_size(width, height, base, "bucket")
    exact_short = base * min(width, height) / max(width, height)
    short = min(w, h)
    if short > BUCKET_STEP:
        assert abs(short - exact_short) <= BUCKET_STEP / 2
    else:  # clamped up to one step: the photo was at least that narrow
        assert exact_short <= BUCKET_STEP * 1.5
    # orientation is kept (a near-square photo may round to square, never flip)
    assert not (width > height and w < h) and not (width < height and w > h)


@given(long=sides, short_a=sides, short_b=sides, base=bases)
def test_a_wider_photo_never_gets_a_narrower_bucket(long, short_a, short_b, base):
    a, b = sorted((min(short_a, long), min(short_b, long)))
    assert target_size(long, a, base, "bucket")[1] <= target_size(long, b, base, "bucket")[1]


@given(width=sides, height=sides, base=bases, mode=st.sampled_from(["square", "subject", "pad"]))
def test_square_modes_are_always_base_squared(width, height, base, mode):
    assert target_size(width, height, base, mode) == (base, base)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    base=st.sampled_from([64, 128]),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_framing_fills_the_target_exactly_from_a_box_inside_the_photo(width, height, base, mode, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    size = target_size(width, height, base, mode)
    fitted, framing = frame(image, size, mode)
    assert fitted.size == size and fitted.mode == "RGB"
    left, top, right, bottom = framing.crop_box
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    crop_w, crop_h = right - left, bottom - top
    if mode == "pad":
        assert framing.crop_box == (0, 0, width, height)
        pad_left, pad_top, pad_right, pad_bottom = framing.pad_box
        assert 0 <= pad_left < pad_right <= size[0] and 0 <= pad_top < pad_bottom <= size[1]
        placed_w, placed_h = pad_right - pad_left, pad_bottom - pad_top
        assert max(placed_w, placed_h) == base  # the photo touches two opposite edges
        # the photo keeps its aspect, to within a pixel of rounding
        assert abs(placed_w * height - placed_h * width) <= max(width, height)
        assert framing.scale == max(placed_w / width, placed_h / height)
    else:
        assert framing.pad_box is None
        # the crop has the target's aspect, to within a pixel of rounding
        assert abs(crop_w * size[1] - crop_h * size[0]) <= max(size)
        assert crop_w == width or crop_h == height  # the largest such window
        assert framing.scale == max(size[0] / crop_w, size[1] / crop_h)
