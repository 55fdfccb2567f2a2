import numpy as np
import pytest
from PIL import Image

from fluxlora.evaluation.grid import (
    BACKGROUND,
    HIGHLIGHT,
    GridLayout,
    compose_grid,
    format_step,
    format_strength,
)

STRENGTHS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
STEPS = [250, 500, 750]


def _colour(row, col):
    return (20 + 70 * row, 30 + 50 * col, 200 - 40 * col)


def _cells(rows=3, cols=4, size=(64, 48)):
    return [[Image.new("RGB", size, _colour(r, c)) for c in range(cols)] for r in range(rows)]


def _grid(cells=None, **kwargs):
    cells = cells or _cells()
    kwargs.setdefault("title", '"a photo of sks bottle" seed 0 64x48 20 steps')
    return compose_grid(
        cells,
        [format_step(s) for s in STEPS[: len(cells)]],
        [format_strength(s) for s in STRENGTHS[: len(cells[0])]],
        **kwargs,
    )


def _has_ink(image, box):
    region = np.asarray(image.crop(box))
    return bool((region != np.array(BACKGROUND)).any())


@pytest.mark.parametrize(
    ("rows", "cols", "size"), [(3, 4, (64, 48)), (1, 1, (64, 64)), (2, 5, (256, 128))]
)
def test_size_follows_the_layout_formula(rows, cols, size):
    image, layout = _grid(_cells(rows, cols, size))
    assert isinstance(layout, GridLayout)
    assert (layout.rows, layout.cols) == (rows, cols)
    assert (layout.cell_width, layout.cell_height) == size
    expected_w = 2 * layout.pad + layout.label_width + cols * (layout.cell_width + layout.gap)
    expected_h = (
        2 * layout.pad
        + layout.title_height
        + layout.col_label_height
        + rows * (layout.cell_height + layout.gap)
    )
    assert layout.header_height == layout.title_height + layout.col_label_height
    assert image.size == layout.size == (expected_w, expected_h)
    assert image.mode == "RGB"
    last = layout.cell_box(rows - 1, cols - 1)
    assert (last[2] + layout.pad, last[3] + layout.pad) == image.size


def test_cells_land_in_their_boxes():
    image, layout = _grid()
    boxes = set()
    for r in range(layout.rows):
        for c in range(layout.cols):
            left, top, right, bottom = layout.cell_box(r, c)
            assert (right - left, bottom - top) == (64, 48)
            for x, y in [
                ((left + right) // 2, (top + bottom) // 2),
                (left, top),
                (right - 1, bottom - 1),
            ]:
                assert image.getpixel((x, y)) == _colour(r, c), (r, c, x, y)
            assert image.getpixel((left - 1, top)) != _colour(r, c)
            boxes.add((left, top, right, bottom))
    assert len(boxes) == layout.rows * layout.cols
    with pytest.raises(IndexError):
        layout.cell_box(layout.rows, 0)


def test_labels_and_title_are_drawn():
    image, layout = _grid()
    assert _has_ink(image, layout.title_box)
    assert _has_ink(image, layout.corner_box)
    for r in range(layout.rows):
        assert _has_ink(image, layout.row_label_box(r))
    for c in range(layout.cols):
        assert _has_ink(image, layout.col_label_box(c))
    untitled, bare = _grid(title="")
    assert bare.title_height == 0 and untitled.height < image.height


def test_highlight_frames_the_cell_without_covering_it():
    image, layout = _grid(highlight=(1, 2))
    left, top, right, bottom = layout.cell_box(1, 2)
    assert image.getpixel((left - 1, (top + bottom) // 2)) == HIGHLIGHT
    assert image.getpixel((right, top - layout.border)) == HIGHLIGHT
    assert image.getpixel((left, top)) == _colour(1, 2)
    plain, _ = _grid()
    assert plain.getpixel((left - 1, (top + bottom) // 2)) == BACKGROUND
    with pytest.raises(ValueError, match="highlight"):
        _grid(highlight=(3, 0))


def test_long_titles_wrap_inside_the_grid():
    words = " ".join(["a photo of sks bottle on a wooden table"] * 12)
    image, layout = _grid(title=words + "\nseed 7 64x48 20 steps")
    _, short = _grid(title="short")
    assert layout.title_height > short.title_height
    assert image.width == _grid()[0].width  # the title never widens the grid


def test_mismatched_cells_rejected():
    cells = _cells()
    cells[2][1] = Image.new("RGB", (64, 50))
    with pytest.raises(ValueError, match=r"same size.*\(2, 1\)"):
        _grid(cells)
    ragged = _cells()
    ragged[1] = ragged[1][:3]
    with pytest.raises(ValueError, match="row 1"):
        compose_grid(ragged, ["a", "b", "c"], ["1", "2", "3", "4"], title="t")
    with pytest.raises(ValueError, match="row labels"):
        compose_grid(_cells(), ["a"], ["1", "2", "3", "4"], title="t")
    with pytest.raises(ValueError, match="column labels"):
        compose_grid(_cells(), ["a", "b", "c"], ["1"], title="t")
    with pytest.raises(ValueError, match="at least one"):
        compose_grid([], [], [], title="t")


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (0, "0.0"),
        (-0.0, "0.0"),
        (1, "1.0"),
        (0.2, "0.2"),
        (0.25, "0.25"),
        (0.1 + 0.2, "0.3"),
        (1 / 3, "0.333"),
        (-0.5, "-0.5"),
        (1.5, "1.5"),
    ],
)
def test_format_strength(value, label):
    assert format_strength(value) == label


def test_format_step():
    assert format_step(750) == "step 750"
