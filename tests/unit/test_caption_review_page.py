"""The HTML review page: parsed as a browser would see it, its script run in node where available,
and the edits file it produces read back."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from fluxlora_client.review_page import (
    EDITS_FORMAT,
    ReviewItem,
    image_data_uri,
    parse_edits,
    render_review_page,
)


class PageParser(HTMLParser):
    """Collects the cards (image + textarea per stem) and the page's scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.textareas: dict[str, str] = {}
        self.scripts: dict[str, str] = {}
        self._in: tuple[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images[attrs["alt"]] = attrs["src"]
        elif tag == "textarea":
            self._in = ("textarea", attrs["data-stem"])
            self.textareas[attrs["data-stem"]] = ""
        elif tag == "script":
            self._in = ("script", attrs["id"])
            self.scripts[attrs["id"]] = ""

    def handle_endtag(self, tag):
        if tag in ("textarea", "script"):
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            kind, name = self._in
            target = self.textareas if kind == "textarea" else self.scripts
            target[name] += data


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.png"
    Image.new("RGB", (900, 600), (200, 20, 20)).save(path)
    return path


# Captions a person might write, including text that must not break the page.
CAPTIONS = {
    "img-1": "ohwx, a bottle on a table",
    "img-2": 'ohwx, a label saying "<b>FLUX</b> & </script> ONE"',
    "ünï-3": "ohwx",
}


def page_for(image: Path) -> str:
    src = image_data_uri(image, 64)
    return render_review_page("ds-1", 4, "ohwx", [ReviewItem(stem, text, src) for stem, text in CAPTIONS.items()])


def test_every_image_sits_beside_its_caption_in_a_textarea(image: Path) -> None:
    parsed = parse(page_for(image))
    assert parsed.textareas == CAPTIONS
    assert set(parsed.images) == set(CAPTIONS)
    data = json.loads(parsed.scripts["fluxlora-review-data"])
    assert data == {"format": "fluxlora-caption-review/1", "dataset_id": "ds-1", "base_version": 4,
                    "trigger_word": "ohwx", "captions": CAPTIONS}


def test_images_are_inline_thumbnails(image: Path) -> None:
    src = parse(page_for(image)).images["img-1"]
    assert src.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as thumb:
        assert max(thumb.size) == 64 and thumb.size == (64, 43)
    full = image_data_uri(image, 0)
    assert full.startswith("data:image/png;base64,")
    assert base64.b64decode(full.split(",", 1)[1]) == image.read_bytes()


def test_transparent_images_stay_png(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(path)
    assert image_data_uri(path, 16).startswith("data:image/png;base64,")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_pages_own_script_builds_the_edits_file(image: Path, tmp_path: Path) -> None:
    parsed = parse(page_for(image))
    script = tmp_path / "app.js"
    script.write_text(parsed.scripts["fluxlora-review-app"], encoding="utf-8")
    data = json.loads(parsed.scripts["fluxlora-review-data"])
    # what a reviewer typed: one real change, one whitespace-only change, one untouched caption
    values = {"img-1": "ohwx, a  green bottle\n", "img-2": CAPTIONS["img-2"] + "  ", "ünï-3": "ohwx"}
    program = (
        f"const app = require({json.dumps(str(script))});"
        f"const data = {json.dumps(data)}; const values = {json.dumps(values)};"
        "console.log(JSON.stringify({edits: app.buildEdits(data, values),"
        " counts: ['ohwx, OHWX', 'ohwx-style', 'ohwxy', 'a b'].map(t => app.countTrigger(t, 'ohwx'))}));"
    )
    out = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["edits"] == {"format": EDITS_FORMAT, "dataset_id": "ds-1", "base_version": 4,
                               "captions": {"img-1": "ohwx, a green bottle"}}
    # the page counts the trigger as count_trigger does: whole tokens, any case
    assert result["counts"] == [2, 0, 0, 0]
    assert parse_edits(result["edits"], "ds-1").captions == {"img-1": "ohwx, a green bottle"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "not a caption edits file"),
        ({"format": "something-else"}, "not a caption edits file"),
        ({"format": EDITS_FORMAT, "base_version": 1, "captions": {}}, "names no dataset_id"),
        ({"format": EDITS_FORMAT, "dataset_id": "ds-2", "base_version": 1, "captions": {}}, "for dataset 'ds-2'"),
        ({"format": EDITS_FORMAT, "dataset_id": "ds-1", "base_version": "4", "captions": {}}, "base_version"),
        ({"format": EDITS_FORMAT, "dataset_id": "ds-1", "base_version": 4, "captions": {"a": 1}}, "map image stems"),
    ],
)
def test_bad_edits_files_are_refused_with_a_clear_message(data, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_edits(data, "ds-1")
