"""The contact sheet of a before/after pair dataset is drawn after the pairing: a tile per pair with
the control (before) left of the target (after), both as trained; a refused pair is a dark tile
with its reason, a control without its target a tile of its own, and every rejected file (control
halves included) is listed in full under the grid."""

from __future__ import annotations

import pytest
from PIL import Image

from fluxlora.preprocessing import contact_sheet as sheet_module
from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.pair_sheet import GAP, PAIR_WIDTH, save_pair_sheet
from fluxlora.preprocessing.pairs import attach_controls, split_pairs
from fluxlora.preprocessing.pipeline import preprocess_files
from photo_corpus import scene

THUMB, PAD = sheet_module.THUMB, sheet_module.PAD


def write_pairs(folder):
    (folder / "control").mkdir(parents=True)
    scene((128, 128), 1).save(folder / "cat.png")
    scene((128, 128), 101).save(folder / "cat_control.png")
    scene((192, 128), 2).save(folder / "dog.png")  # a wide pair, cropped to the square centre
    scene((192, 128), 102).save(folder / "control" / "dog.png")
    scene((128, 128), 3).save(folder / "lonely.png")  # no control
    scene((128, 128), 4).save(folder / "tall.png")
    scene((128, 192), 104).save(folder / "tall_control.png")  # another aspect
    scene((128, 128), 6).save(folder / "orphan_control.png")  # no target
    return folder


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    folder = write_pairs(root / "upload")
    files = [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*.png"))]
    pairs = split_pairs(files)
    out = root / "images"
    manifest = attach_controls(preprocess_files(pairs.targets, out, PreprocessOptions(base_size=128, mode="square")),
                               pairs, out)
    sheet_path = save_pair_sheet(manifest, pairs, out, root / "sheet.png")
    with Image.open(sheet_path) as opened:
        return manifest, out, opened.convert("RGB")


def tile_origin(position, columns):
    row, column = divmod(position, columns)
    return column * (PAIR_WIDTH + 2 * PAD), sheet_module.HEADER + row * (THUMB + 2 * PAD + sheet_module.LABEL)


def thumbnail(path):
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    image.thumbnail((THUMB, THUMB))
    return image


def test_each_kept_pair_is_one_tile_showing_control_then_target(drawn):
    manifest, out, sheet = drawn
    assert [e.stem for e in manifest.images] == ["cat", "dog"]
    # Tiles in source-key order; the control halves of pairs are inside their targets' tiles.
    tiles = ["cat.png", "dog.png", "lonely.png", "orphan_control.png", "tall.png"]
    columns = sheet.width // (PAIR_WIDTH + 2 * PAD)
    assert columns == 4  # at least as wide as six square tiles, so the header fits
    for stem in ("cat", "dog"):
        left, top = tile_origin(tiles.index(f"{stem}.png"), columns)
        left, top = left + PAD, top + PAD
        control, target = thumbnail(out / "control" / f"{stem}.png"), thumbnail(out / f"{stem}.png")
        assert sheet.crop((left, top, left + THUMB, top + THUMB)).tobytes() == control.tobytes()
        right = left + THUMB + GAP
        assert sheet.crop((right, top, right + THUMB, top + THUMB)).tobytes() == target.tobytes()
        assert control.tobytes() != target.tobytes()


def test_refused_pairs_and_lone_halves_are_dark_tiles_with_every_reason_listed(drawn):
    manifest, _, sheet = drawn
    columns = sheet.width // (PAIR_WIDTH + 2 * PAD)
    for position in (2, 3, 4):  # lonely.png, orphan_control.png, tall.png (and its control)
        left, top = tile_origin(position, columns)
        assert sheet.getpixel((left + PAD + PAIR_WIDTH - 10, top + PAD + THUMB - 10)) == sheet_module.REJECT
    reasons = {r.source_key: r.reason for r in manifest.rejected}
    assert set(reasons) == {"lonely.png", "orphan_control.png", "tall.png", "tall_control.png"}
    grid_bottom = sheet_module.HEADER + 2 * (THUMB + 2 * PAD + sheet_module.LABEL)
    # A heading and at least a line per rejected file, the control half of the refused pair included.
    assert sheet.height >= grid_bottom + sheet_module.LINE * (1 + len(reasons))
