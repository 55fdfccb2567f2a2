"""One PNG showing the whole dataset, so a person can look at every photo at once.

Tiles are in source-key order, each a thumbnail of the training image (what the trainer sees,
crop included) with the user's file name underneath. Rejected files are dark tiles with the
gist of the reason, and every reason is written out in full under the grid,
exact duplicates are dimmed with the stem they duplicate, flagged images (blurry, upscaled, near
duplicate, extreme aspect) get an orange frame and their flags. Thumbnails are pasted as they
arrive, so memory is the canvas (bounded by MAX_TILES), not the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from PIL import Image, ImageDraw, ImageEnhance

from fluxlora.common.fonts import label_font
from fluxlora.preprocessing.manifest import Manifest, RejectedFile

THUMB = 96
PAD = 6
LABEL = 30
HEADER = 40
MIN_COLUMNS = 6
MAX_COLUMNS = 12
MAX_TILES = 1000
LINE = 14
MAX_REASON_LINES = 300

BACKGROUND = (246, 246, 246)
INK = (30, 30, 30)
FLAG = (240, 140, 0)
REJECT = (70, 70, 70)
REJECT_INK = (255, 110, 110)
DUPLICATE_INK = (90, 90, 200)

Status = Literal["ok", "flagged", "duplicate", "rejected"]


@dataclass(frozen=True)
class TileMark:
    label: str
    status: Status
    note: str = ""
    key: str = ""
    """The file's path relative to the upload, for the full reasons under the grid."""


class ContactSheet:
    def __init__(self, count: int, thumb_width: int = THUMB) -> None:
        """A sheet of `count` tiles, each a THUMB px high thumbnail box `thumb_width` px wide (wider
        for a before/after pair side by side)."""
        self.count = count
        self.shown = min(count, MAX_TILES)
        self.thumb_width = thumb_width
        # At least MIN_COLUMNS square tiles wide so the header fits even for a handful of files.
        square, cell = THUMB + 2 * PAD, thumb_width + 2 * PAD
        least, most = math.ceil(MIN_COLUMNS * square / cell), max(1, MAX_COLUMNS * square // cell)
        self.columns = max(least, min(most, math.ceil(math.sqrt(max(self.shown, 1)))))
        rows = max(1, math.ceil(self.shown / self.columns))
        self.cell = (thumb_width + 2 * PAD, THUMB + 2 * PAD + LABEL)
        self.canvas = Image.new(
            "RGB", (self.columns * self.cell[0], HEADER + rows * self.cell[1]), BACKGROUND
        )
        self._pasted: set[int] = set()

    def paste(self, position: int, size: tuple[int, int], rgb: bytes) -> None:
        """Put the thumbnail for the file at `position` (source-key order) in its tile."""
        if position >= self.shown:
            return
        thumb = Image.frombytes("RGB", size, rgb)
        left, top = self._origin(position)
        self.canvas.paste(thumb, (left + PAD + (self.thumb_width - size[0]) // 2, top + PAD + (THUMB - size[1]) // 2))
        self._pasted.add(position)

    def finish(self, marks: list[TileMark], title: str, subtitle: str = "",
               rejected: Sequence[RejectedFile] | None = None) -> Image.Image:
        """Draw the marks (one per position, in order), the header and, under the grid, every
        rejected file's reason in full (`rejected`, else the rejected marks'); returns the sheet."""
        small, bold = label_font(11), label_font(13)
        listed = marks if rejected is None else [TileMark("", "rejected", r.reason, r.source_key) for r in rejected]
        reasons = self._reason_lines(listed, small)
        if reasons:
            grown = Image.new("RGB", (self.canvas.width, self.canvas.height + PAD + LINE * len(reasons) + PAD),
                              BACKGROUND)
            grown.paste(self.canvas, (0, 0))
            top = self.canvas.height + PAD
            self.canvas = grown
            draw = ImageDraw.Draw(self.canvas)
            for i, line in enumerate(reasons):
                draw.text((PAD, top + LINE * i), line, fill=REJECT if i else INK, font=bold if i == 0 else small)
        draw = ImageDraw.Draw(self.canvas)
        if self.shown < self.count:
            subtitle = f"first {self.shown} of {self.count} files shown; {subtitle}"
        draw.text((PAD, 5), title, fill=INK, font=bold)
        legend = "orange: flagged, grey: rejected, blue: exact duplicate (not trained)"
        draw.text((PAD, 22), f"{subtitle}   {legend}" if subtitle else legend, fill=(110, 110, 110), font=small)
        for position, mark in enumerate(marks[: self.shown]):
            self._mark(draw, position, mark, small)
        return self.canvas

    def save(self, path: Path, marks: list[TileMark], title: str, subtitle: str = "",
             rejected: Sequence[RejectedFile] | None = None) -> Path:
        image = self.finish(marks, title, subtitle, rejected)
        image.info = {}
        image.save(path, format="PNG", compress_level=1)  # a preview: fast beats 20% smaller
        return path

    def _reason_lines(self, marks: list[TileMark], font) -> list[str]:
        rejected = [mark for mark in marks if mark.status == "rejected"]
        if not rejected:
            return []
        lines = [f"Rejected ({len(rejected)}):"]
        width = self.canvas.width - 2 * PAD
        for mark in rejected:
            lines.extend(wrap_to_width(f"{mark.key or mark.label}: {mark.note}", font, width, indent="    "))
        if len(lines) > MAX_REASON_LINES:
            lines = [*lines[: MAX_REASON_LINES - 1], "... and more: report.json lists every rejected file"]
        return lines

    def _origin(self, position: int) -> tuple[int, int]:
        row, column = divmod(position, self.columns)
        return column * self.cell[0], HEADER + row * self.cell[1]

    def _mark(self, draw: ImageDraw.ImageDraw, position: int, mark: TileMark, font) -> None:
        left, top = self._origin(position)
        box = (left + PAD - 2, top + PAD - 2, left + PAD + self.thumb_width + 1, top + PAD + THUMB + 1)
        if mark.status == "rejected":
            draw.rectangle(box, fill=REJECT)
            draw.text((left + PAD + 4, top + PAD + 4), "REJECTED", fill=REJECT_INK, font=font)
            lines = wrap_to_width(gist(mark.note), font, self.thumb_width - 8)
            if len(lines) > 5:
                lines = [*lines[:4], "(see below)"]
            for i, line in enumerate(lines):
                draw.text((left + PAD + 4, top + PAD + 20 + 14 * i), line, fill=(235, 235, 235), font=font)
        elif mark.status == "duplicate":
            if position in self._pasted:
                region = self.canvas.crop(box)
                self.canvas.paste(ImageEnhance.Brightness(region).enhance(0.45), box[:2])
            draw.rectangle(box, outline=DUPLICATE_INK, width=2)
        elif mark.status == "flagged":
            draw.rectangle(box, outline=FLAG, width=3)
        ink = {"rejected": REJECT, "duplicate": DUPLICATE_INK, "flagged": FLAG}.get(mark.status, INK)
        label_top, chars = top + PAD + THUMB + 3, 17 * self.thumb_width // THUMB
        draw.text((left + PAD, label_top), _fit(mark.label, chars), fill=INK if mark.status == "ok" else ink,
                  font=font)
        if mark.status in ("flagged", "duplicate"):
            draw.text((left + PAD, label_top + 13), _fit(mark.note, chars), fill=ink, font=font)


def gist(reason: str) -> str:
    """The part of a rejection reason before its details: "could not be decoded", "too small"."""
    for stop in (":", " (", ";"):
        head = reason.split(stop, 1)[0]
        if head and head != reason:
            reason = head
    return reason


def wrap_to_width(text: str, font, width: int, indent: str = "") -> list[str]:
    """Lines of `text` no wider than `width` px in `font`, broken at spaces (a word wider than the
    line is broken inside it); nothing is dropped."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        piece = (indent if lines else "") + word
        while font.getlength(piece) > width and len(piece) > 1:
            cut = len(piece) - 1
            while cut > 1 and font.getlength(piece[:cut]) > width:
                cut -= 1
            lines.append(piece[:cut])
            piece = indent + piece[cut:]
        lines.append(piece)
    return lines


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 2] + ".."


def sheet_positions(keys: Sequence[str], rejected_upstream: Sequence[RejectedFile]) -> dict[str, int]:
    """Tile index of every input: all of them in source-key order, refused ones included."""
    ordered = sorted([*keys, *(entry.source_key for entry in rejected_upstream)])
    return {key: i for i, key in enumerate(ordered)}


def tile_marks(manifest: Manifest, positions: dict[str, int]) -> list[TileMark]:
    """What each tile says, from the manifest's decisions."""
    marks: list[TileMark | None] = [None] * len(positions)
    for entry in manifest.images:
        flags = ", ".join(flag.replace("_", "-") for flag in entry.flags)
        status: Status = "flagged" if flags else "ok"
        marks[positions[entry.source_key]] = TileMark(_name(entry.source_key), status, flags)
    for duplicate in manifest.duplicates:
        marks[positions[duplicate.source_key]] = TileMark(
            _name(duplicate.source_key), "duplicate", f"= {_name(duplicate.duplicate_of)}"
        )
    for entry in manifest.rejected:
        key = entry.source_key
        marks[positions[key]] = TileMark(_name(key), "rejected", entry.reason, key)
    return [mark or TileMark("", "ok") for mark in marks]


def sheet_header(manifest: Manifest) -> tuple[str, str]:
    """(title, subtitle) of the sheet."""
    options = manifest.options
    return (
        f"{manifest.dataset_fingerprint}: {manifest.image_count} images, {manifest.rejected_count} rejected, "
        f"{manifest.duplicate_count} duplicates, {manifest.flagged_count} flagged",
        f"{options.lora_type} LoRA, {options.mode} {options.base_size} px.",
    )


def _name(key: str) -> str:
    return PurePosixPath(key).name or key
