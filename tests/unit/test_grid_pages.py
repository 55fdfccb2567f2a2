"""Very large grids are split into pages of whole checkpoint rows."""

from __future__ import annotations

import pytest

from fluxlora.evaluation.grid import page_rows


@pytest.mark.parametrize(
    ("rows", "per_page", "expected"),
    [(10, 4, [(0, 4), (4, 8), (8, 10)]), (3, 8, [(0, 3)]), (4, 4, [(0, 4)]), (1, 1, [(0, 1)])],
)
def test_rows_are_split_into_pages_in_order(rows, per_page, expected):
    pages = page_rows(rows, per_page)
    assert [(p.start, p.stop) for p in pages] == expected
    assert [r for p in pages for r in p] == list(range(rows))


@pytest.mark.parametrize(("rows", "per_page"), [(0, 4), (4, 0)])
def test_pages_need_rows(rows, per_page):
    with pytest.raises(ValueError, match="rows_per_page"):
        page_rows(rows, per_page)
