"""The contact sheet of an editing (before/after pair) dataset, drawn once the pairs are decided.

The pairing (pairs.attach_controls) rejects pairs after the targets went through the pipeline, so
the sheet the pipeline draws would show a refused pair as a kept image and no control at all.
This one has a tile per pair, labelled with the target's name: the control (before) on the left
and the target (after) on the right, both as they will be trained (crop included), so the user
reviews the edit each pair teaches. A refused pair is one dark tile with the gist of its reason;
a control without a target gets a tile of its own; every rejected file, control halves included,
is listed in full under the grid. Thumbnails are read from the written training images one pair
at a time, so memory is the canvas.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from PIL import Image

from fluxlora.preprocessing.contact_sheet import BACKGROUND, THUMB, ContactSheet, Status, TileMark
from fluxlora.preprocessing.manifest import Manifest
from fluxlora.preprocessing.pairs import CONTROL_DIR, PAIR_REFUSED, PairedFiles

GAP = 4  # between the control and the target of a tile
PAIR_WIDTH = 2 * THUMB + GAP


def save_pair_sheet(manifest: Manifest, pairs: PairedFiles, out_dir: Path, path: Path) -> Path:
    """Write the sheet of `manifest` (after attach_controls; its images in out_dir, their controls
    in out_dir/control/) to `path`."""
    out_dir = Path(out_dir)
    in_pair_tiles = {control_key for control_key, _ in pairs.controls.values()}
    tiles = sorted({*(e.source_key for e in manifest.images), *(d.source_key for d in manifest.duplicates),
                    *(r.source_key for r in manifest.rejected)} - in_pair_tiles)
    position = {key: i for i, key in enumerate(tiles)}
    sheet = ContactSheet(len(tiles), thumb_width=PAIR_WIDTH)
    marks: list[TileMark] = [TileMark(_name(key), "ok") for key in tiles]
    for entry in manifest.images:
        flags = ", ".join(flag.replace("_", "-") for flag in entry.flags)
        status: Status = "flagged" if flags else "ok"
        marks[position[entry.source_key]] = TileMark(_name(entry.source_key), status, flags)
        _paste(sheet, position[entry.source_key], out_dir / CONTROL_DIR / entry.file_name, out_dir / entry.file_name)
    for duplicate in manifest.duplicates:  # the same pixels as the kept target it names
        marks[position[duplicate.source_key]] = TileMark(_name(duplicate.source_key), "duplicate",
                                                         f"= {_name(duplicate.duplicate_of)}")
        _paste(sheet, position[duplicate.source_key], None, out_dir / f"{duplicate.stem}.png")
    for rejected in manifest.rejected:
        if rejected.source_key in position:
            # The tile gives the gist of why (the pair's, not "pair refused"); the list below has it all.
            note = rejected.reason.removeprefix(PAIR_REFUSED)
            marks[position[rejected.source_key]] = TileMark(_name(rejected.source_key), "rejected", note)
    return sheet.save(path, marks, *pair_sheet_header(manifest), rejected=manifest.rejected)


def pair_sheet_header(manifest: Manifest) -> tuple[str, str]:
    """(title, subtitle) of a pair dataset's sheet."""
    options = manifest.options
    return (
        f"{manifest.dataset_fingerprint}: {manifest.image_count} pairs, {manifest.rejected_count} files rejected, "
        f"{manifest.duplicate_count} duplicates, {manifest.flagged_count} flagged",
        f"tiles: control | target. {options.mode} {options.base_size} px.",
    )


def _paste(sheet: ContactSheet, position: int, control: Path | None, target: Path) -> None:
    """control | target as one thumbnail, each half fitted into THUMB x THUMB; a missing file
    leaves its half empty."""
    tile = Image.new("RGB", (PAIR_WIDTH, THUMB), BACKGROUND)
    for left, image_path in ((0, control), (THUMB + GAP, target)):
        if image_path is None or not image_path.is_file():
            continue
        with Image.open(image_path) as opened:
            half = opened.convert("RGB")
            half.thumbnail((THUMB, THUMB))
        tile.paste(half, (left + (THUMB - half.width) // 2, (THUMB - half.height) // 2))
    sheet.paste(position, tile.size, tile.tobytes())


def _name(key: str) -> str:
    return PurePosixPath(key).name or key
