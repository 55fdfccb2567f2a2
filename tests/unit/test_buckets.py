import itertools

import pytest

from fluxlora.preprocessing.buckets import bucket_label, target_size, validate_base_size


@pytest.mark.parametrize(
    ("width", "height", "base", "expected"),
    [
        # landscape
        (4000, 3000, 1024, (1024, 768)),
        (1920, 1080, 1024, (1024, 576)),
        (3000, 2000, 1024, (1024, 704)),  # 682.7 -> nearest multiple of 64
        (4000, 3000, 768, (768, 576)),
        (4000, 3000, 512, (512, 384)),
        (1920, 1080, 512, (512, 320)),  # 288 is exactly halfway: rounds up
        (3000, 2000, 512, (512, 320)),
        (640, 480, 64, (64, 64)),
        # portrait
        (3000, 4000, 1024, (768, 1024)),
        (1080, 1920, 1024, (576, 1024)),
        (1080, 1920, 768, (448, 768)),
        (2000, 3000, 768, (512, 768)),
        (480, 640, 512, (384, 512)),
        (480, 640, 64, (64, 64)),
        # square, including images smaller than base (upscaled later)
        (500, 500, 1024, (1024, 1024)),
        (2048, 2048, 768, (768, 768)),
        (512, 512, 512, (512, 512)),
        (100, 100, 64, (64, 64)),
        # extreme aspect ratios stay at least one step wide
        (6000, 500, 1024, (1024, 64)),
        (10, 10000, 1024, (64, 1024)),
    ],
)
def test_bucket_targets(width, height, base, expected):
    assert target_size(width, height, base, "bucket") == expected


@pytest.mark.parametrize("base", [64, 512, 768, 1024])
@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (777, 777), (1, 900)])
def test_square_targets(base, size):
    assert target_size(*size, base, "square") == (base, base)


@pytest.mark.parametrize("base", [64, 128, 512, 768, 1024])
def test_bucket_invariants(base):
    sides = [1, 63, 64, 100, 333, 480, 512, 600, 640, 767, 1000, 1080, 1920, 3000, 4032, 9000]
    for width, height in itertools.product(sides, sides):
        w, h = target_size(width, height, base, "bucket")
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= base * base
        assert max(w, h) == base
        # orientation kept: a near-square photo may round to square, never flip
        assert not (width > height and w < h) and not (width < height and w > h)
        exact = base * min(width, height) / max(width, height)
        assert abs(min(w, h) - exact) <= 32 or min(w, h) == 64


@pytest.mark.parametrize("bad", [0, -64, 63, 100, 1000, 1023, 512.0, "512", True, None])
def test_bad_base_sizes_rejected(bad):
    with pytest.raises(ValueError, match="base_size"):
        target_size(640, 480, bad, "bucket")
    with pytest.raises(ValueError, match="base_size"):
        validate_base_size(bad)


def test_bad_mode_and_size_rejected():
    with pytest.raises(ValueError, match="mode"):
        target_size(640, 480, 512, "crop")
    with pytest.raises(ValueError, match="positive"):
        target_size(0, 480, 512, "bucket")


def test_bucket_label():
    assert bucket_label((1024, 768)) == "1024x768"
