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
