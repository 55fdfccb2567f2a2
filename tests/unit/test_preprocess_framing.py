"""Crop modes: the subject-aware crop keeps an off-centre subject the centre crop loses, and pad
keeps the whole photo on its own background colour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fluxlora.preprocessing.framing import centre_crop_box, frame, subject_crop_box
from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.pipeline import preprocess_files
from fluxlora.preprocessing.saliency import best_offset
from photo_corpus import scene

WALL = (205, 220, 235)
SUBJECT = (700, 120, 840, 380)  # a bottle near the right edge of a 900x400 shot


def product_shot(size=(900, 400), box=SUBJECT, wall=WALL):
    image = Image.new("RGB", size, wall)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    draw.rectangle((left, top + 40, right, bottom), fill=(30, 110, 60))
    cap = (right - left) // 3
    draw.rectangle((left + cap, top, right - cap, top + 40), fill=(180, 30, 30))
    return image


def contains(outer, inner):
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def test_subject_crop_keeps_the_subject_the_centre_crop_cuts_off():
    image = product_shot()
    assert not contains(centre_crop_box(*image.size, (256, 256)), SUBJECT)
    box = subject_crop_box(image, (256, 256))
    assert box[2] - box[0] == box[3] - box[1] == 400
    assert contains(box, SUBJECT)


@pytest.mark.parametrize("turn", [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270])
def test_subject_crop_works_along_either_axis(turn):
    image = product_shot().transpose(turn)  # portrait: the window slides vertically
    # Where the subject's pixels ended up after turning.
    ys = np.flatnonzero((np.asarray(image) != WALL).any(axis=2).any(axis=1))
    left, top, right, bottom = subject_crop_box(image, (256, 256))
    assert (left, right) == (0, 400)
    assert top <= ys.min() and ys.max() < bottom


def test_a_subject_smaller_than_the_window_ends_up_centred():
    image = product_shot(size=(1200, 400), box=(300, 150, 380, 330))
    left, _, right, _ = subject_crop_box(image, (256, 256))
    assert abs((left + right) / 2 - 340) <= 8


def test_a_plain_photo_falls_back_to_the_centre():
    flat = Image.new("RGB", (900, 400), WALL)
    assert subject_crop_box(flat, (256, 256)) == centre_crop_box(900, 400, (256, 256))
    assert best_offset(np.zeros(50), 900, 400) == 250


def test_pad_keeps_the_whole_photo_on_its_border_colour():
    image = product_shot()
    fitted, framing = frame(image, (256, 256), "pad")
    assert fitted.size == (256, 256)
    assert framing.crop_box == (0, 0, 900, 400)
    assert framing.pad_color == WALL
    left, top, right, bottom = framing.pad_box
    assert (left, right) == (0, 256) and bottom - top == round(400 * 256 / 900)
    assert fitted.getpixel((128, 2)) == WALL and fitted.getpixel((128, 253)) == WALL
    # the bottle is in the output, near the right edge, as in the photo
    pixels = np.asarray(fitted)
    assert (np.abs(pixels[:, 200:240].astype(int) - (30, 110, 60)).sum(axis=2) < 30).any()


@pytest.mark.parametrize("mode", ["square", "subject", "pad"])
def test_square_modes_through_the_pipeline(tmp_path, mode):
    path = tmp_path / "shot.png"
    product_shot().save(path)
    options = PreprocessOptions(base_size=256, mode=mode)
    manifest = preprocess_files([("shot.png", path)], tmp_path / "out", options)
    [entry] = manifest.images
    assert entry.size == (256, 256) and entry.bucket == "256x256"
    with Image.open(tmp_path / "out" / entry.file_name) as out:
        assert out.size == (256, 256)
    if mode == "pad":
        assert entry.crop_box == (0, 0, 900, 400) and entry.pad_color == WALL
        assert entry.pad_box is not None and entry.flags == []
    else:
        assert entry.pad_box is None and entry.crop_box[2] - entry.crop_box[0] == 400
    assert contains(entry.crop_box, SUBJECT) == (mode != "square")


def test_pad_mode_flags_upscaling_and_extreme_aspect(tmp_path):
    path = tmp_path / "strip.png"
    scene((400, 100), 3).save(path)
    # blur off: a drawing has less detail than a photo
    options = PreprocessOptions(base_size=512, mode="pad", min_side=64, blur_threshold=0)
    manifest = preprocess_files([("strip.png", path)], tmp_path / "out", options)
    [entry] = manifest.images
    assert entry.pad_box == (0, 192, 512, 320)
    assert set(entry.flags) == {"upscaled", "extreme_aspect"}
    assert any("upscaled 1.28x (whole 400x100 to 512x128)" in w for w in entry.warnings)
    assert any("extreme aspect ratio 4.0:1 leaves the photo 25% of the padded square" in w for w in entry.warnings)


def test_every_mode_is_deterministic(tmp_path):
    path = tmp_path / "shot.png"
    product_shot().save(path)
    for mode in ("bucket", "square", "subject", "pad"):
        options = PreprocessOptions(base_size=128, mode=mode)
        a = preprocess_files([("s.png", path)], tmp_path / mode / "a", options)
        b = preprocess_files([("s.png", path)], tmp_path / mode / "b", options)
        assert a == b
        name = a.images[0].file_name
        assert (tmp_path / mode / "a" / name).read_bytes() == (tmp_path / mode / "b" / name).read_bytes()
