import numpy as np
import pytest
from PIL import Image

from fluxlora.common.fonts import label_font, label_font_path
from fluxlora.demo.sample_data import LABEL, write_sample_photos
from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.pipeline import preprocess_files


def _open(path):
    with Image.open(path) as image:
        image.load()
        return image


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_sample_photos(tmp_path_factory.mktemp("photos"))


def test_count_names_and_formats(photos, tmp_path):
    assert len(photos) == 24
    assert [p.stem for p in photos] == [f"bottle_{i:03d}" for i in range(24)]
    formats = {_open(p).format for p in photos}
    assert formats == {"JPEG", "PNG"}
    assert 1 <= sum(p.suffix == ".png" for p in photos) <= 2
    assert len(write_sample_photos(tmp_path / "few", count=3)) == 3
    assert write_sample_photos(tmp_path / "none", count=0) == []


def test_deterministic_for_a_seed(photos, tmp_path):
    again = write_sample_photos(tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in photos]
    other = write_sample_photos(tmp_path / "other", count=4, seed=1)
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(other, photos, strict=False))


def test_varied_sizes_and_content(photos):
    sizes = {_open(p).size for p in photos}
    assert len(sizes) >= 4
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert any(w == h for w, h in sizes)
    means = {tuple(np.asarray(_open(p).convert("RGB")).mean(axis=(0, 1)).round()) for p in photos}
    assert len(means) == len(photos)  # backgrounds and framing differ photo to photo


def test_bottle_and_label_are_drawn(photos):
    for path in photos:
        pixels = np.asarray(_open(path).convert("RGB")).astype(int)
        # the photo's overall brightness varies, so compare against scaled label colours
        label_like = max(
            (np.abs(pixels - np.array(LABEL) * f).sum(axis=2) < 30).sum()
            for f in np.linspace(0.85, 1.12, 10)
        )
        glass_like = (
            (pixels[..., 1] > pixels[..., 0] + 40) & (pixels[..., 1] > pixels[..., 2] + 15)
        ).sum()
        assert label_like > 200, path.name
        assert glass_like > 1000, path.name


def test_sample_photos_pass_preprocessing(photos, tmp_path):
    files = [(f"photos/{p.name}", p) for p in photos]
    manifest = preprocess_files(files, tmp_path / "out", PreprocessOptions(base_size=128))
    assert manifest.image_count == len(photos)
    assert manifest.rejected == [] and manifest.duplicates == []
    # No photo is blurry or monochrome. Two renders of one bottle on plain studio backgrounds with
    # the same framing are near duplicates to the gate calibrated on real photos (bench/gate.py):
    # at most one such pair, which the demo's report names (it trains them all).
    assert {flag for image in manifest.images for flag in image.flags} <= {"near_duplicate"}
    assert [len(group.stems) for group in manifest.near_duplicate_groups] in ([], [2])
    assert all("near duplicates" in warning for warning in manifest.warnings), manifest.warnings


def test_label_font_is_truetype():
    assert label_font_path() is not None and label_font_path().endswith(".ttf")
    font = label_font(24)
    assert font.getbbox("FLUX ONE")[3] > 12
