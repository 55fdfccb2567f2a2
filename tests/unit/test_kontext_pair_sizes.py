"""A control image of the same aspect as its target but another resolution is kept and brought to
the target's training size (FLUX.1 Kontext's position ids line the halves up only at one size, and
the grid and generate hand the pipeline the control at the output's size): a larger one is
downscaled silently, a smaller one upscaled and flagged `control_upscaled`, which the report and
the contact sheet show."""

from __future__ import annotations

from PIL import Image

from fluxlora.preprocessing import contact_sheet as sheet_module
from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.pair_sheet import save_pair_sheet
from fluxlora.preprocessing.pairs import attach_controls, split_pairs
from fluxlora.preprocessing.pipeline import preprocess_files
from fluxlora.preprocessing.report import build_report
from photo_corpus import scene


def test_a_control_of_another_resolution_is_brought_to_its_targets_size(tmp_path):
    upload = tmp_path / "upload"
    upload.mkdir()
    scene((128, 128), 1).save(upload / "big.png")
    scene((256, 256), 101).save(upload / "big_control.png")  # twice the target's resolution
    scene((128, 128), 2).save(upload / "small.png")
    scene((64, 64), 102).save(upload / "small_control.png")  # half of it
    pairs = split_pairs([(p.name, p) for p in sorted(upload.iterdir())])
    out = tmp_path / "images"
    manifest = attach_controls(preprocess_files(pairs.targets, out, PreprocessOptions(base_size=128, mode="square")),
                               pairs, out)
    entries = {e.stem: e for e in manifest.images}
    assert set(entries) == {"big", "small"} and not manifest.rejected
    for stem in entries:
        with Image.open(out / "control" / f"{stem}.png") as control, Image.open(out / f"{stem}.png") as target:
            assert control.size == target.size == (128, 128)
    assert entries["big"].flags == [] and entries["small"].flags == ["control_upscaled"]
    [warning] = entries["small"].warnings
    assert warning.startswith("control image small_control.png (64x64) has a lower resolution than its target "
                              "(128x128) and is upscaled 2.00x")
    report = build_report(manifest)
    assert [(f.stem, f.flags) for f in report.flagged] == [("small", ["control_upscaled"])]

    sheet_path = save_pair_sheet(manifest, pairs, out, tmp_path / "sheet.png")
    with Image.open(sheet_path) as opened:
        sheet = opened.convert("RGB")
    second = sheet.width // 4  # the tiles of big.png and small.png, four to a row
    pad, top = sheet_module.PAD, sheet_module.HEADER + sheet_module.PAD
    assert sheet.getpixel((second + pad - 1, top + 40)) == sheet_module.FLAG  # small.png's pair is framed
    assert sheet.getpixel((pad - 1, top + 40)) == sheet_module.BACKGROUND
