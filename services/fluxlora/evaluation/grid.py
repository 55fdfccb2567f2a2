"""The labelled XY grid: one row per checkpoint, one column per LoRA strength.

The geometry lives in GridLayout so the report (and tests) can point at any cell without
re-deriving where the drawing code put it.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

from fluxlora.common.fonts import Font, label_font

Box = tuple[int, int, int, int]

BACKGROUND = (255, 255, 255)
INK = (28, 28, 32)
MUTED = (96, 96, 104)
HIGHLIGHT = (230, 80, 20)
MAX_TITLE_LINES = 4


@dataclass(frozen=True)
class GridLayout:
    """Where everything sits in the grid image; all boxes are (left, top, right, bottom).

    Horizontally: pad | label column | gap | cols x cell, gap between cells | pad.
    Vertically:   pad | title | column labels | gap | rows x cell, gap between cells | pad.
    So width = 2*pad + label_width + cols*(cell_width + gap) and
    height = 2*pad + title_height + col_label_height + rows*(cell_height + gap).
    The gaps and pads are at least `border` wide, so the highlight frame drawn around a cell
    never covers a neighbour or the cell itself.
    """

    rows: int
    cols: int
    cell_width: int
    cell_height: int
    label_width: int
    title_height: int
    col_label_height: int
    pad: int
    gap: int
    border: int

    @property
    def header_height(self) -> int:
        return self.title_height + self.col_label_height

    @property
    def width(self) -> int:
        return 2 * self.pad + self.label_width + self.cols * self.cell_width + self.cols * self.gap

    @property
    def height(self) -> int:
        return (
            2 * self.pad + self.header_height + self.rows * self.cell_height + self.rows * self.gap
        )

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def origin(self) -> tuple[int, int]:
        """Top-left corner of cell (0, 0)."""
        return self.pad + self.label_width + self.gap, self.pad + self.header_height + self.gap

    def cell_box(self, row: int, col: int) -> Box:
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"cell ({row}, {col}) outside a {self.rows}x{self.cols} grid")
        x0, y0 = self.origin
        left = x0 + col * (self.cell_width + self.gap)
        top = y0 + row * (self.cell_height + self.gap)
        return left, top, left + self.cell_width, top + self.cell_height

    def row_label_box(self, row: int) -> Box:
        _, top, _, bottom = self.cell_box(row, 0)
        return self.pad, top, self.pad + self.label_width, bottom

    def col_label_box(self, col: int) -> Box:
        left, _, right, _ = self.cell_box(0, col)
        top = self.pad + self.title_height
        return left, top, right, top + self.col_label_height

    @property
    def title_box(self) -> Box:
        return self.pad, self.pad, self.width - self.pad, self.pad + self.title_height

    @property
    def corner_box(self) -> Box:
        """Above the row labels, left of the column labels: where the axis names go."""
        top = self.pad + self.title_height
        return self.pad, top, self.pad + self.label_width, top + self.col_label_height


def format_strength(value: float) -> str:
    """LoRA strength as a column label: 1 -> "1.0", 0.25 -> "0.25", 1/3 -> "0.333"."""
    text = f"{value:.3f}".rstrip("0")
    text = text + "0" if text.endswith(".") else text
    return "0.0" if text == "-0.0" else text


def format_step(step: int) -> str:
    """Checkpoint step as a row label: 750 -> "step 750"."""
    return f"step {step}"


def page_rows(rows: int, rows_per_page: int) -> list[range]:
    """Row ranges of the pages of a grid with `rows` rows: 10 rows at 4 per page -> 0-3, 4-7, 8-9."""
    if rows < 1 or rows_per_page < 1:
        raise ValueError(f"need rows >= 1 and rows_per_page >= 1, got {rows} and {rows_per_page}")
    return [range(start, min(start + rows_per_page, rows)) for start in range(0, rows, rows_per_page)]


def compose_grid(
    cells: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str],
    *,
    title: str,
    row_axis: str = "checkpoint",
    col_axis: str = "strength",
    highlight: tuple[int, int] | None = None,
    font_size: int | None = None,
    header_image: Image.Image | None = None,
    header_label: str = "",
) -> tuple[Image.Image, GridLayout]:
    """Lay `cells[row][col]` out under a title, with row and column labels.

    `title` is the caller's description of the run (prompt, seed, size, steps); newlines are
    kept and long lines wrapped to the grid width. `highlight` (row, col), usually the
    recommended cell, gets a coloured frame. `header_image` (an editing grid's control image) is
    shown under the title at most cell size, captioned `header_label`.
    """
    rows, cols = len(cells), len(cells[0]) if cells else 0
    if rows == 0 or cols == 0:
        raise ValueError("the grid needs at least one row and one column of cells")
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    cell_width, cell_height = cells[0][0].size
    for r, row in enumerate(cells):
        if len(row) != cols:
            raise ValueError(f"row {r} has {len(row)} cells, row 0 has {cols}")
        for c, cell in enumerate(row):
            if cell.size != (cell_width, cell_height):
                raise ValueError(
                    f"all cells must be the same size: cell ({r}, {c}) is "
                    f"{cell.width}x{cell.height}, cell (0, 0) is {cell_width}x{cell_height}"
                )
    if highlight is not None and not (0 <= highlight[0] < rows and 0 <= highlight[1] < cols):
        raise ValueError(f"highlight {highlight} outside a {rows}x{cols} grid")

    size = font_size or max(12, min(36, min(cell_width, cell_height) // 10))
    font, title_font = label_font(size), label_font(round(size * 1.15))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _line_height(measure, font)
    border = max(3, size // 5)
    pad, gap = 2 * border, 2 * border
    text_pad = size // 2

    corner = f"{row_axis} \u2193  {col_axis} \u2192"
    label_width = (
        max(_text_width(measure, text, font) for text in [*row_labels, corner]) + 2 * text_pad
    )
    grid_w = 2 * pad + label_width + cols * (cell_width + gap)
    title_lines = _wrap(measure, title, title_font, grid_w - 2 * pad)
    title_height = (
        len(title_lines) * _line_height(measure, title_font) + text_pad if title_lines else 0
    )
    thumb = None
    if header_image is not None:
        thumb = header_image.convert("RGB")
        thumb.thumbnail((cell_width, cell_height))
        title_height += line_h + thumb.height + text_pad
    layout = GridLayout(
        rows=rows,
        cols=cols,
        cell_width=cell_width,
        cell_height=cell_height,
        label_width=label_width,
        title_height=title_height,
        col_label_height=line_h + 2 * text_pad,
        pad=pad,
        gap=gap,
        border=border,
    )

    image = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    title_line_h = _line_height(measure, title_font)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * title_line_h), line, font=title_font, fill=INK)
    if thumb is not None:
        top = pad + len(title_lines) * title_line_h + (text_pad if title_lines else 0)
        draw.text((pad, top), _fit(measure, header_label, font, grid_w - 2 * pad), font=font, fill=MUTED)
        image.paste(thumb, (pad, top + line_h))
    _draw_in(draw, layout.corner_box, corner, font, MUTED, anchor="lm", inset=text_pad)
    for c, text in enumerate(col_labels):
        box = layout.col_label_box(c)
        _draw_in(draw, box, _fit(measure, text, font, cell_width), font, INK, anchor="mm")
    for r, text in enumerate(row_labels):
        _draw_in(draw, layout.row_label_box(r), text, font, INK, anchor="rm", inset=text_pad)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            left, top, _, _ = layout.cell_box(r, c)
            image.paste(cell.convert("RGB"), (left, top))
    if highlight is not None:
        left, top, right, bottom = layout.cell_box(*highlight)
        # Drawn in the gap around the cell so the recommended image itself stays untouched.
        draw.rectangle(
            (left - border, top - border, right + border - 1, bottom + border - 1),
            outline=HIGHLIGHT,
            width=border,
        )
    return image, layout


def _line_height(draw: ImageDraw.ImageDraw, font: Font) -> int:
    _, top, _, bottom = draw.textbbox((0, 0), "Hg\u2193", font=font)
    return round((bottom - top) * 1.3)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, max_w: int) -> str:
    """`text`, shortened with an ellipsis until it fits `max_w`."""
    if _text_width(draw, text, font) <= max_w:
        return text
    while text and _text_width(draw, text + "\u2026", font) > max_w:
        text = text[:-1]
    return text + "\u2026"


def _wrap(draw: ImageDraw.ImageDraw, title: str, font: Font, max_w: int) -> list[str]:
    lines: list[str] = []
    for paragraph in title.splitlines():
        words = paragraph.split()
        if not words:
            continue
        line = words[0]
        for word in words[1:]:
            candidate = f"{line} {word}"
            if _text_width(draw, candidate, font) <= max_w:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    if len(lines) > MAX_TITLE_LINES:
        lines = [*lines[: MAX_TITLE_LINES - 1], lines[MAX_TITLE_LINES - 1] + " \u2026"]
    return [_fit(draw, line, font, max_w) for line in lines]


def _draw_in(
    draw: ImageDraw.ImageDraw,
    box: Box,
    text: str,
    font: Font,
    fill: tuple[int, int, int],
    *,
    anchor: str,
    inset: int = 0,
) -> None:
    left, top, right, bottom = box
    y = (top + bottom) / 2
    x = {"l": left + inset, "m": (left + right) / 2, "r": right - inset}[anchor[0]]
    draw.text((x, y), text, font=font, fill=fill, anchor=anchor)
