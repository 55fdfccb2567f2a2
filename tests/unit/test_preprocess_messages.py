"""What the gate says names the user's files and folder, gives the decoder's reason, and never
reads "upscaled 1.0x" (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fluxlora.preprocessing.images import ImageRejected, decode_image
from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.naming import folder_name
from fluxlora.preprocessing.pipeline import preprocess_files
from photo_corpus import scene


def test_a_tiff_the_decoder_cannot_read_says_could_not_be_decoded_and_why(tmp_path):
    # Planar RGB in two pages, as scanners write: the TIFF plugin refuses it ("unknown pixel mode"),
    # which Image.open reports only as "cannot identify image file".
    skimage = pytest.importorskip("skimage")
    path = Path(skimage.__file__).parent / "data" / "multipage_rgb.tif"
    with pytest.raises(ImageRejected) as rejected:
        decode_image(path)
    assert rejected.value.reason.startswith("could not be decoded: a TIFF file the decoder cannot read (")
    assert "unknown pixel mode" in rejected.value.reason and "not an image" not in rejected.value.reason


def test_a_file_that_only_starts_like_a_jpeg_could_not_be_decoded(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)
    with pytest.raises(ImageRejected) as rejected:
        decode_image(path)
    assert rejected.value.reason.startswith("could not be decoded")
    text = tmp_path / "notes.jpg"
    text.write_text("shopping list")
    with pytest.raises(ImageRejected) as rejected:
        decode_image(text)
    assert rejected.value.reason.startswith("not an image in a supported format")


@pytest.mark.parametrize(("size", "flagged", "text"), [((1000, 750), False, ""), ((800, 600), True, "upscaled 1.28x")])
def test_upscaling_is_flagged_only_when_it_shows_and_never_as_1_0x(tmp_path, size, flagged, text):
    path = tmp_path / "photo.png"
    scene(size, 1).save(path)
    manifest = preprocess_files([("trip/photo.png", path)], tmp_path / "out", PreprocessOptions(base_size=1024))
    [entry] = manifest.images
    assert ("upscaled" in entry.flags) == flagged
    assert not any("1.0x" in warning for warning in entry.warnings)
    if text:
        assert any(text in warning for warning in entry.warnings)


def test_messages_say_the_uploaded_folder_not_the_internal_prefix():
    assert folder_name("uploads/u-3f62aa0123456789/") == "the uploaded folder"
    assert folder_name("imports/shoot-7/") == "the folder 'imports/shoot-7/'"


def test_dataset_warnings_name_the_users_files(tmp_path):
    grey = tmp_path / "in" / "holiday" / "IMG_0001.JPG"
    grey.parent.mkdir(parents=True)
    scene((400, 300), 3).convert("L").convert("RGB").save(grey, "JPEG")
    colour = tmp_path / "in" / "holiday" / "IMG_0002.JPG"
    scene((400, 300), 4).save(colour, "JPEG")
    files = [("holiday/IMG_0001.JPG", grey), ("holiday/IMG_0002.JPG", colour)]
    manifest = preprocess_files(files, tmp_path / "out", PreprocessOptions(base_size=256))
    [warning] = [w for w in manifest.warnings if "monochrome" in w]
    assert "1 of 2 images are greyscale or toned monochrome (sepia-like): holiday/IMG_0001.JPG." in warning
    assert "learns monochrome" in warning
    with Image.open(tmp_path / "out" / manifest.images[0].file_name) as out:
        assert out.mode == "RGB"  # still trained as RGB: the warning is what changed
