"""The "import" captioner: existing .txt / .csv / .jsonl captions matched to images by file name."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxlora.captioning.captioners import known_captioners, load_captioner
from fluxlora.captioning.captioners.imported import read_caption_files
from fluxlora.captioning.dataset import caption_images


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def captions_of(root: Path) -> dict[str, str]:
    return {key: entry.text for key, entry in read_caption_files(root).items()}


def test_sidecars_csv_and_jsonl_are_read(tmp_path: Path) -> None:
    write(tmp_path, "photos/IMG_1.txt", "a bottle\non a table\n")
    write(tmp_path, "captions.csv", 'file,caption\nimg_2.jpg,"a bottle, green"\n\nimg_3.png,a jar\n')
    write(tmp_path, "more.jsonl", '{"file": "sub/img_4.webp", "caption": "a cup"}\n\n{"image": "img_5", "text": "x"}\n')
    write(tmp_path, "notes.md", "not a caption file")
    assert captions_of(tmp_path) == {
        "photos/img_1": "a bottle on a table",  # sidecar: whole file, one line
        "img_2": "a bottle, green",
        "img_3": "a jar",
        "sub/img_4": "a cup",
        "img_5": "x",
    }


def test_a_csv_without_a_header_is_file_then_caption(tmp_path: Path) -> None:
    write(tmp_path, "c.csv", "a.jpg,first\nb.jpg,second\n")
    assert captions_of(tmp_path) == {"a": "first", "b": "second"}


def test_an_unquoted_caption_keeps_its_commas(tmp_path: Path) -> None:
    write(tmp_path, "c.csv", "a.jpg,a bottle, studio light,white\n")
    assert captions_of(tmp_path) == {"a": "a bottle, studio light,white"}


def test_a_header_may_name_its_columns_in_any_order(tmp_path: Path) -> None:
    write(tmp_path, "c.csv", "text,image\nfirst,a.jpg\n")
    assert captions_of(tmp_path) == {"a": "first"}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.csv", "a.jpg\n", "c.csv line 1: expected file,caption"),
        ("c.jsonl", '{"file": "a.jpg"}\n', 'c.jsonl line 1: expected {"file"'),
        ("c.jsonl", "not json\n", "c.jsonl line 1: not JSON"),
        ("c.csv", "a.jpg,one\nA.png,two\n", "two captions for image 'a': c.csv line 1 and c.csv line 2"),
    ],
)
def test_bad_caption_files_are_named_with_the_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    write(tmp_path, name, text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
        read_caption_files(tmp_path)


def test_a_caption_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="'a.txt' is not UTF-8"):
        read_caption_files(tmp_path)


def make_images(root: Path, names: list[str]) -> list[Path]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        Image.new("RGB", (8, 8)).save(root / name)
        paths.append(root / name)
    return paths


def test_images_are_matched_by_stem_or_upload_name_and_cleaned_like_any_caption(tmp_path: Path) -> None:
    assert "import" in known_captioners()
    source = tmp_path / "source"
    write(source, "captions.csv", "file,caption\nIMG 1.jpg,A woman holding a bottle.\nb.jpg,a bottle\n")
    write(source, "holiday/c.txt", "ohwx on a beach, ohwx")
    write(source, "unused.txt", "nobody asks for this")
    images = make_images(tmp_path / "dataset", ["IMG_1.png", "b.png", "c.png"])
    # preprocessing renamed "IMG 1.jpg" to the stem IMG_1; the manifest remembers the upload's name
    aliases = {"IMG_1": ["uploads/u-1/IMG 1.jpg"], "c": ["uploads/u-1/holiday/c.jpg"]}
    captioner = load_captioner("import", source, aliases=aliases)
    captions = caption_images(images, captioner, "ohwx", remove_phrases=["bottle"])
    assert captions == {"IMG_1": "ohwx, a woman holding.", "b": "ohwx", "c": "ohwx, on a beach"}
    assert captioner.unmatched() == ["unused.txt (unused)"]


def test_an_image_without_an_imported_caption_is_named(tmp_path: Path) -> None:
    write(tmp_path / "source", "a.txt", "a dog")
    images = make_images(tmp_path / "dataset", ["a.png", "b.png", "c.png"])
    captioner = load_captioner("import", tmp_path / "source")
    with pytest.raises(ValueError, match="no imported caption for image\\(s\\) b, c"):
        caption_images(images, captioner, "ohwx")


def test_a_source_without_caption_files_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "readme.md", "no captions here")
    with pytest.raises(ValueError, match="no captions found"):
        load_captioner("import", tmp_path)
    with pytest.raises(FileNotFoundError, match="directory of caption files"):
        load_captioner("import", tmp_path / "missing")


def write_zip(path: Path, members: dict[str, bytes | str]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_the_caption_files_inside_a_zip_are_unpacked_under_its_name(tmp_path: Path) -> None:
    from fluxlora.captioning.captioners.imported import unpack_caption_files

    archive = write_zip(tmp_path / "photos.zip", {
        "img1.jpg": b"\xff\xd8 not unpacked", "img1.txt": "a bottle", "sub/img2.TXT": "a jar",
        "captions.csv": "file,caption\nimg3.jpg,a cup\n", "__MACOSX/._img1.txt": "resource fork",
    })
    root = tmp_path / "root"
    written = unpack_caption_files(archive, root, "up/photos.zip")
    assert sorted(written) == ["up/photos.zip/captions.csv", "up/photos.zip/img1.txt", "up/photos.zip/sub/img2.TXT"]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(written)
    assert captions_of(root) == {"up/photos.zip/img1": "a bottle", "up/photos.zip/sub/img2": "a jar",
                                 "img3": "a cup"}


def test_a_zip_that_preprocessing_would_refuse_is_refused_naming_it(tmp_path: Path) -> None:
    from fluxlora.captioning.captioners.imported import unpack_caption_files

    archive = write_zip(tmp_path / "evil.zip", {"../outside.txt": "escape", "img1.txt": "a bottle"})
    with pytest.raises(ValueError, match="zip 'evil.zip' refused: unsafe path '../outside.txt'"):
        unpack_caption_files(archive, tmp_path / "root", "evil.zip")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "root").exists()


def test_zipped_captions_meet_photos_in_the_same_zip_and_photos_uploaded_beside_it(tmp_path: Path) -> None:
    from fluxlora.captioning.captioners.imported import unpack_caption_files

    root = tmp_path / "root"
    unpack_caption_files(write_zip(tmp_path / "a.zip", {"x.txt": "from a", "sub/y.txt": "y in a"}), root, "a.zip")
    unpack_caption_files(write_zip(tmp_path / "b.zip", {"x.txt": "from b", "loose.txt": "beside"}), root, "b.zip")
    images = make_images(tmp_path / "dataset", ["x.png", "x-2.png", "y.png", "loose.png"])
    # preprocessing named the photos by where they came from: each zip's x, and a photo beside the zips
    aliases = {"x": ["a.zip/x.jpg"], "x-2": ["b.zip/x.jpg"], "y": ["a.zip/sub/y.jpg"], "loose": ["loose.jpg"]}
    captioner = load_captioner("import", root, aliases=aliases, archives=["a.zip", "b.zip"])
    captions = caption_images(images, captioner, "ohwx", style="tags")
    assert captions == {"x": "ohwx, from a", "x-2": "ohwx, from b", "y": "ohwx, y in a", "loose": "ohwx, beside"}
    assert captioner.unmatched() == []


def test_a_path_two_zips_share_does_not_caption_a_photo_outside_them(tmp_path: Path) -> None:
    from fluxlora.captioning.captioners.imported import unpack_caption_files

    root = tmp_path / "root"
    unpack_caption_files(write_zip(tmp_path / "a.zip", {"x.txt": "from a"}), root, "a.zip")
    unpack_caption_files(write_zip(tmp_path / "b.zip", {"x.txt": "from b"}), root, "b.zip")
    [image] = make_images(tmp_path / "dataset", ["x.png"])
    captioner = load_captioner("import", root, aliases={"x": ["x.jpg"]}, archives=["a.zip", "b.zip"])
    with pytest.raises(ValueError, match="no imported caption for image\\(s\\) x"):
        caption_images([image], captioner, "ohwx")
