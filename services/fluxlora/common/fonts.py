"""A TrueType font for labels drawn into images (sample photos, evaluation grids).

DejaVu Sans ships inside matplotlib, a dependency already, so labels look the same on every
machine without system fonts or downloads.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=1)
def label_font_path() -> str | None:
    """Path of DejaVuSans.ttf, or None when matplotlib (or its font) is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    # The bundled file first: asking font_manager would build matplotlib's font cache (seconds).
    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if bundled.is_file():
        return str(bundled)
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except (ImportError, ValueError, OSError):
        return None


def label_font(size: int) -> Font:
    """DejaVu Sans at `size` px, else Pillow's built-in font."""
    path = label_font_path()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size)
