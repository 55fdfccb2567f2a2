import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw
from pydantic import ValidationError

from fluxlora.preprocessing.buckets import target_size
from fluxlora.preprocessing.images import ImageRejected, fit_to, load_image
from fluxlora.preprocessing.manifest import Manifest, PreprocessOptions
from fluxlora.preprocessing.naming import safe_stem, unique_stems
from fluxlora.preprocessing.pipeline import dataset_fingerprint, preprocess_files
from photo_corpus import png_header_claiming, scene

OPTIONS = PreprocessOptions(base_size=256)


@pytest.fixture
def corpus(tmp_path):
    """(files, expectations) for a messy upload: good, odd and broken files."""
    src = tmp_path / "src"
    src.mkdir()
    files = {}

    def add(key, write):
        path = src / key.replace("/", "__")
        write(path)
        files[key] = path

    add("photos/normal.jpg", lambda p: scene((800, 600), 1).save(p, "JPEG", quality=90))

    def rotated(p):
        exif = Image.Exif()
        exif[0x0112] = 6  # stored landscape, to be shown rotated 90 degrees clockwise
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        scene((800, 600), 2).save(p, "JPEG", exif=exif.tobytes(), icc_profile=srgb)

    add("photos/rotated.jpg", rotated)

    def rgba(p):
        image = scene((400, 300), 3).convert("RGBA")
        alpha = Image.new("L", image.size, 255)
        ImageDraw.Draw(alpha).rectangle((0, 0, 99, 99), fill=0)
        image.putalpha(alpha)
        image.save(p, "PNG")

    add("photos/cutout.png", rgba)
    add("photos/palette.png", lambda p: scene((300, 400), 4).quantize(64).save(p, "PNG"))
    add("photos/grey.jpg", lambda p: scene((500, 500), 5).convert("L").save(p, "JPEG"))
    add(
        "photos/deep.png",
        lambda p: Image.fromarray(np.full((300, 400), 32896, np.uint16)).save(p, "PNG"),
    )
    add("photos/cmyk.jpg", lambda p: Image.new("CMYK", (400, 300), (0, 255, 255, 0)).save(p))
    add("photos/shot.webp", lambda p: scene((640, 480), 11).save(p, "WEBP", quality=90))
    add("photos/scan.tif", lambda p: scene((480, 640), 12).save(p, "TIFF"))
    add("photos/old.bmp", lambda p: scene((512, 384), 13).save(p, "BMP"))
    add("photos/anim.gif", lambda p: scene((300, 300), 14).save(p, "GIF"))
    add("photos/small.png", lambda p: scene((100, 80), 6).save(p, "PNG"))
    add("photos/tiny.png", lambda p: scene((40, 30), 7).save(p, "PNG"))
    add("photos/empty.jpg", lambda p: p.write_bytes(b""))
    add("photos/notes.jpg", lambda p: p.write_text("shopping list: milk, eggs\n"))
    add("photos/iphone.jpg", lambda p: p.write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64))

    def truncated(p):
        buffer = io.BytesIO()
        scene((800, 600), 8).save(buffer, "JPEG")
        p.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    add("photos/truncated.jpg", truncated)
    add("photos/bomb.png", lambda p: p.write_bytes(png_header_claiming(20000, 20000)))
    add("photos/big.png", lambda p: p.write_bytes(png_header_claiming(11000, 11000)))
    add("photos/normal_copy.jpg", lambda p: shutil.copyfile(files["photos/normal.jpg"], p))

    def same_pixels_as_png(p):
        with Image.open(files["photos/normal.jpg"]) as image:
            image.convert("RGB").save(p, "PNG")

    add("photos/normal.png", same_pixels_as_png)
    return files


REJECTED = {
    "photos/tiny.png": "too small",
    "photos/empty.jpg": "empty file",
    "photos/notes.jpg": "not an image",
    "photos/iphone.jpg": "HEIC",
    "photos/anim.gif": "GIF files are not supported",
    "photos/truncated.jpg": "truncated or corrupt",
    "photos/bomb.png": "too large",
    "photos/big.png": "too large",
}
DUPLICATES = {
    "photos/normal_copy.jpg": ("photos/normal.jpg", "file bytes"),
    "photos/normal.png": ("photos/normal.jpg", "pixels"),
}


def _run(corpus, out_dir, options=OPTIONS, **kwargs):
    return preprocess_files(list(corpus.items()), out_dir, options, **kwargs)


def test_every_file_is_accounted_for(corpus, tmp_path):
    manifest = _run(corpus, tmp_path / "out")
    kept = [entry.source_key for entry in manifest.images]
    rejected = [entry.source_key for entry in manifest.rejected]
    duplicates = [entry.source_key for entry in manifest.duplicates]
    assert sorted(kept + rejected + duplicates) == sorted(corpus)
    assert len(set(kept + rejected + duplicates)) == len(corpus)
    assert (manifest.image_count, manifest.rejected_count, manifest.duplicate_count) == (
        len(kept),
        len(rejected),
        len(duplicates),
    )


def test_rejections_name_the_file_and_the_reason(corpus, tmp_path):
    manifest = _run(corpus, tmp_path / "out")
    reasons = {entry.source_key: entry.reason for entry in manifest.rejected}
    assert set(reasons) == set(REJECTED)
    for key, phrase in REJECTED.items():
        assert phrase in reasons[key], (key, reasons[key])
    assert "64 px" in reasons["photos/tiny.png"]  # the floor is stated
    assert any("rejected" in warning for warning in manifest.warnings)


def test_duplicates_reported_once_and_not_written(corpus, tmp_path):
    manifest = _run(corpus, tmp_path / "out")
    found = {d.source_key: (d.duplicate_of, d.match) for d in manifest.duplicates}
    assert found == DUPLICATES
    assert {d.stem for d in manifest.duplicates} == {"normal"}
    assert [e.stem for e in manifest.images].count("normal") == 1
    assert not any(e.source_key in DUPLICATES for e in manifest.images)


def test_outputs_match_buckets_and_are_plain_rgb(corpus, tmp_path):
    out = tmp_path / "out"
    manifest = _run(corpus, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(e.file_name for e in manifest.images)
    for entry in manifest.images:
        assert entry.file_name == f"{entry.stem}.png"
        expected = target_size(*entry.original_size, OPTIONS.base_size, OPTIONS.mode)
        assert entry.size == expected
        assert entry.bucket == f"{expected[0]}x{expected[1]}"
        left, top, right, bottom = entry.crop_box
        assert 0 <= left < right <= entry.original_size[0]
        assert 0 <= top < bottom <= entry.original_size[1]
        with Image.open(out / entry.file_name) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == entry.size
            assert "icc_profile" not in image.info and "exif" not in image.info
    assert sum(manifest.buckets.values()) == manifest.image_count


def test_modes_and_orientation_are_normalised(corpus, tmp_path):
    out = tmp_path / "out"
    manifest = _run(corpus, out)
    by_key = {entry.source_key: entry for entry in manifest.images}

    rotated = by_key["photos/rotated.jpg"]
    assert rotated.original_size == (600, 800) and rotated.size == (192, 256)

    cutout = by_key["photos/cutout.png"]
    assert any("transparency flattened" in w for w in cutout.warnings)
    with Image.open(out / cutout.file_name) as image:
        assert image.getpixel((2, 2)) == (255, 255, 255)  # the transparent corner

    with Image.open(out / by_key["photos/deep.png"].file_name) as image:
        # 16-bit mid-grey must come out mid-grey: Pillow alone would clip it to white
        assert all(abs(v - 128) <= 1 for v in image.getpixel((100, 100)))

    cmyk = by_key["photos/cmyk.jpg"]
    assert cmyk.source_mode == "CMYK"
    with Image.open(out / cmyk.file_name) as image:
        red, green, blue = image.getpixel((100, 100))
        assert red > 200 and green < 60 and blue < 60

    assert by_key["photos/palette.png"].source_mode == "P"
    assert by_key["photos/grey.jpg"].source_mode == "L"
    formats = {
        by_key[f"photos/{name}"].source_format for name in ("shot.webp", "scan.tif", "old.bmp")
    }
    assert formats == {"WEBP", "TIFF", "BMP"}
    assert any("upscaled" in w for w in by_key["photos/small.png"].warnings)
    assert not any("upscaled" in w for w in by_key["photos/normal.jpg"].warnings)


def test_background_option_is_used_for_transparency(corpus, tmp_path):
    options = PreprocessOptions(base_size=256, background=(10, 20, 30))
    manifest = _run({"cutout.png": corpus["photos/cutout.png"]}, tmp_path / "out", options)
    with Image.open(tmp_path / "out" / manifest.images[0].file_name) as image:
        assert image.getpixel((2, 2)) == (10, 20, 30)


def test_runs_are_byte_identical_and_order_independent(corpus, tmp_path):
    first = _run(corpus, tmp_path / "a")
    reversed_corpus = dict(reversed(list(corpus.items())))
    second = _run(reversed_corpus, tmp_path / "b")
    assert first.model_dump_json() == second.model_dump_json()
    for entry in first.images:
        a = (tmp_path / "a" / entry.file_name).read_bytes()
        assert a == (tmp_path / "b" / entry.file_name).read_bytes()


def test_fingerprint_is_stable_and_sensitive(corpus, tmp_path):
    files = list(corpus.items())
    manifest = _run(corpus, tmp_path / "out")
    fingerprint = dataset_fingerprint(files, OPTIONS)
    assert fingerprint == manifest.dataset_fingerprint
    assert fingerprint == dataset_fingerprint(list(reversed(files)), OPTIONS)
    assert fingerprint.startswith("ds-") and len(fingerprint) == 15
    assert dataset_fingerprint(files, PreprocessOptions(base_size=512)) != fingerprint
    assert dataset_fingerprint(files, OPTIONS.model_copy(update={"mode": "square"})) != fingerprint
    assert dataset_fingerprint(files[1:], OPTIONS) != fingerprint
    corpus["photos/grey.jpg"].write_bytes(corpus["photos/normal.jpg"].read_bytes())
    assert dataset_fingerprint(files, OPTIONS) != fingerprint


def test_dataset_size_warnings(corpus, tmp_path):
    manifest = _run(corpus, tmp_path / "concrete")
    size_warning = next(w for w in manifest.warnings if w.startswith("Only"))
    assert f"Only {manifest.image_count} usable images for a concrete LoRA" in size_warning
    assert "angles" in size_warning and "backgrounds" in size_warning

    style = _run(corpus, tmp_path / "style", PreprocessOptions(base_size=256, lora_type="style"))
    assert any("style LoRA" in w and "50" in w for w in style.warnings)

    empty = preprocess_files([], tmp_path / "none", OPTIONS)
    assert empty.image_count == 0 and empty.warnings[0].startswith("No usable images")


def test_enough_varied_sharp_images_means_no_warning(tmp_path):
    files = []
    for i in range(16):
        path = tmp_path / f"{i}.png"
        scene((128, 96), 100 + i).save(path)
        files.append((f"set/{i:02d}.png", path))
    manifest = preprocess_files(files, tmp_path / "out", PreprocessOptions(base_size=64))
    assert manifest.image_count == 16
    assert manifest.warnings == []


def test_progress_and_manifest_round_trip(corpus, tmp_path):
    calls = []
    manifest = _run(corpus, tmp_path / "out", progress=lambda *args: calls.append(args))
    assert calls == [(done, len(corpus)) for done in range(1, len(corpus) + 1)]
    assert Manifest.model_validate_json(manifest.model_dump_json(indent=2)) == manifest


def test_repeated_source_key_is_a_caller_error(corpus, tmp_path):
    path = corpus["photos/normal.jpg"]
    with pytest.raises(ValueError, match="given twice"):
        preprocess_files([("a.jpg", path), ("a.jpg", path)], tmp_path / "out", OPTIONS)


def test_stems_keep_safe_names_and_stay_unique(tmp_path):
    assert safe_stem("photos/IMG_0042.JPG") == "IMG_0042"
    assert safe_stem("My Photo (1).jpeg") == "My_Photo_1"
    assert safe_stem("C:\\Users\\me\\Café.png") == "Cafe"
    assert safe_stem("写真.jpg") == "image"
    stems = unique_stems(["a/img.jpg", "b/IMG.png", "img-2.jpg"])
    assert stems == {"a/img.jpg": "img", "b/IMG.png": "IMG-3", "img-2.jpg": "img-2"}

    files = []
    for i, key in enumerate(["a/shot.jpg", "b/shot.jpg"]):
        path = tmp_path / f"{i}.png"
        scene((300, 300), 10 + i).save(path)
        files.append((key, path))
    manifest = preprocess_files(files, tmp_path / "out", OPTIONS)
    assert [e.stem for e in manifest.images] == ["shot", "shot-2"]


def test_load_image_and_fit_to(corpus):
    image = load_image(corpus["photos/rotated.jpg"])
    assert image.mode == "RGB" and image.size == (600, 800)
    with pytest.raises(ImageRejected, match="too large") as raised:
        load_image(corpus["photos/normal.jpg"], max_pixels=1000)
    assert "MP" in raised.value.reason

    fitted, box = fit_to(Image.new("RGB", (1000, 500)), (256, 192))
    assert fitted.size == (256, 192)
    assert box == (166, 0, 833, 500)  # centred, 4:3 of the full height
    fitted, box = fit_to(Image.new("RGB", (300, 900)), (64, 64))
    assert box == (0, 300, 300, 600)


def test_options_are_validated():
    assert PreprocessOptions().min_side == 256
    assert PreprocessOptions(base_size=64).min_side == 64
    assert PreprocessOptions(base_size=512, min_side=100).min_side == 100
    for bad in ({"base_size": 1000}, {"mode": "crop"}, {"background": (0, 0, 256)}, {"x": 1}):
        with pytest.raises(ValidationError):
            PreprocessOptions(**bad)


def test_unreadable_path_is_rejected_not_raised(tmp_path):
    manifest = preprocess_files([("gone.jpg", tmp_path / "missing.jpg")], tmp_path / "out", OPTIONS)
    assert manifest.rejected[0].source_key == "gone.jpg"
    assert "cannot read" in manifest.rejected[0].reason


def test_outputs_do_not_depend_on_input_paths(corpus, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = {}
    for key, path in corpus.items():
        copies[key] = moved / f"x{len(copies)}"
        shutil.copyfile(path, copies[key])
    assert (
        _run(corpus, tmp_path / "a").model_dump_json()
        == _run(copies, tmp_path / "b").model_dump_json()
    )
    assert dataset_fingerprint(list(corpus.items()), OPTIONS) == dataset_fingerprint(
        list(copies.items()), OPTIONS
    )


def test_demo_base_size_round_trip(corpus, tmp_path):
    manifest = _run(corpus, tmp_path / "out", PreprocessOptions(base_size=64, mode="square"))
    assert set(manifest.buckets) == {"64x64"}
    assert all(Path(tmp_path / "out" / e.file_name).exists() for e in manifest.images)
