"""The dataset report and the contact sheet say the same as the manifest, in a form a person reads."""

from __future__ import annotations

import pytest
from PIL import Image

from fluxlora.preprocessing import contact_sheet as sheet_module
from fluxlora.preprocessing.manifest import PreprocessOptions, RejectedFile
from fluxlora.preprocessing.pipeline import preprocess_files
from fluxlora.preprocessing.report import build_report, truncated_for_proto
from photo_corpus import write_bad_inputs

OPTIONS = PreprocessOptions(base_size=128)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    folder = write_bad_inputs(root / "in", size=(256, 192))
    files = [(p.name, p) for p in sorted(folder.iterdir()) if p.suffix != ".zip"]
    refused = [RejectedFile(source_key="slip.zip", reason="archive refused: unsafe path")]
    manifest = preprocess_files(files, root / "out", OPTIONS, contact_sheet=root / "sheet.png",
                                rejected_upstream=refused)
    return manifest, root / "sheet.png", sorted([key for key, _ in files] + ["slip.zip"])


def test_report_counts_and_lists_match_the_manifest(processed):
    manifest, _, keys = processed
    report = build_report(manifest)
    assert report.dataset_id == manifest.dataset_fingerprint
    assert (report.file_count, report.image_count, report.rejected_count, report.duplicate_count) == (
        len(keys), manifest.image_count, manifest.rejected_count, manifest.duplicate_count
    )
    assert report.image_count + report.rejected_count + report.duplicate_count == report.file_count
    assert report.buckets == manifest.buckets and sum(report.buckets.values()) == report.image_count
    assert report.recommended_images == 30 and report.lora_type == "concrete" and report.crop_mode == "bucket"
    assert {r.source_key for r in report.rejected} == {
        "truncated.jpg", "zero.jpg", "notes.jpg", "bomb.png", "tiny.png", "slip.zip"
    }
    [group] = report.duplicate_groups
    assert (group.kept_source_key, group.duplicate_source_keys) == ("good_1.jpg", ["good_1_copy.jpg"])
    assert [g.stems for g in report.near_duplicate_groups] == [["good_2", "good_2_reencoded"]]
    assert report.near_duplicate_count == 2
    flagged = {f.stem: f.flags for f in report.flagged}
    assert flagged["good_2"] == ["near_duplicate"]
    assert report.flagged_count == len(report.flagged) == manifest.flagged_count
    assert report.warnings == manifest.warnings


def test_report_lists_are_cut_for_the_grpc_result_only(processed):
    report = build_report(processed[0])
    assert truncated_for_proto(report) is report
    cut = truncated_for_proto(report, limit=1)
    assert cut.truncated and len(cut.rejected) == 1 and len(report.rejected) == 6
    assert cut.rejected_count == report.rejected_count


def tile_origin(position, columns):
    row, column = divmod(position, columns)
    cell_w, cell_h = sheet_module.THUMB + 2 * sheet_module.PAD, sheet_module.THUMB + 2 * sheet_module.PAD
    return column * cell_w, sheet_module.HEADER + row * (cell_h + sheet_module.LABEL)


def test_contact_sheet_shows_every_file_marked_by_outcome(processed):
    manifest, path, keys = processed
    with Image.open(path) as opened:
        sheet = opened.convert("RGB")
    columns = sheet.width // (sheet_module.THUMB + 2 * sheet_module.PAD)
    assert columns == sheet_module.MIN_COLUMNS
    rows = -(-len(keys) // columns)
    grid = sheet_module.HEADER + rows * (sheet_module.THUMB + 2 * sheet_module.PAD + sheet_module.LABEL)
    # Under the grid: a heading and every rejected file's reason in full.
    assert sheet.height > grid + sheet_module.LINE * (1 + manifest.rejected_count)

    def inside(key):  # a pixel inside the thumbnail area, clear of the labels drawn on rejected tiles
        left, top = tile_origin(keys.index(key), columns)
        return sheet.getpixel((left + sheet_module.PAD + 90, top + sheet_module.PAD + 90))

    def frame(key):  # a pixel on the tile's frame line
        left, top = tile_origin(keys.index(key), columns)
        return sheet.getpixel((left + sheet_module.PAD - 1, top + sheet_module.PAD + 40))

    for key in ("zero.jpg", "bomb.png", "slip.zip"):
        assert inside(key) == sheet_module.REJECT
    assert frame("good_2.jpg") == sheet_module.FLAG
    assert frame("good_1_copy.jpg") == sheet_module.DUPLICATE_INK
    assert frame("good_3.png") == sheet_module.BACKGROUND  # fine images get no frame
    assert inside("good_3.png") != sheet_module.BACKGROUND  # but do get their thumbnail


def test_contact_sheet_caps_its_tiles(monkeypatch, tmp_path):
    monkeypatch.setattr(sheet_module, "MAX_TILES", 3)
    sheet = sheet_module.ContactSheet(10)
    assert sheet.shown == 3
    sheet.paste(5, (2, 2), bytes(12))  # past the cap: ignored, no error
    image = sheet.finish([sheet_module.TileMark(f"t{i}", "ok") for i in range(10)], "title")
    assert image.height == sheet_module.HEADER + sheet.cell[1]


def test_rejection_reasons_are_never_cut_off():
    reason = ("could not be decoded: a TIFF file the decoder cannot read (SyntaxError: unknown pixel mode); "
              "open it in an image editor and save it again as JPEG or PNG")
    marks = [
        sheet_module.TileMark("scan.tif", "rejected", reason, "scans/2024/scan.tif"),
        sheet_module.TileMark("a", "ok"),
    ]
    sheet = sheet_module.ContactSheet(2)
    font = sheet_module.label_font(11)
    lines = sheet._reason_lines(marks, font)
    assert lines[0] == "Rejected (1):"
    assert " ".join(line.strip() for line in lines[1:]) == f"scans/2024/scan.tif: {reason}"
    assert all(font.getlength(line) <= sheet.canvas.width - 2 * sheet_module.PAD for line in lines)
    # The tile shows the gist, whole words, within the thumbnail.
    assert sheet_module.gist(reason) == "could not be decoded"
    assert sheet_module.gist("too small: 40x30; the short side must be 64") == "too small"
    tile = sheet_module.wrap_to_width("not an image in a supported format", font, sheet_module.THUMB - 8)
    assert " ".join(tile) == "not an image in a supported format" and len(tile) > 1
    image = sheet.finish(marks, "title")
    assert image.height == sheet_module.HEADER + sheet.cell[1] + 2 * sheet_module.PAD + sheet_module.LINE * len(lines)
