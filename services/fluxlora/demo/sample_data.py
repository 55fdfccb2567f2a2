"""Synthetic "product photos" of one bottle, for the demo and tests.

A concrete LoRA needs one subject seen many ways, so the bottle (green glass, red cap, a cream
"FLUX ONE" label) stays the same while framing, size, tilt, background and lighting change.
Everything is drawn with PIL from a seeded RNG: no downloads, same bytes for the same seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

from fluxlora.common.fonts import label_font

PHOTO_SIZES: tuple[tuple[int, int], ...] = (
    (480, 640),
    (640, 480),
    (512, 512),
    (600, 400),
    (400, 600),
    (576, 768),
)
GLASS = (34, 112, 72)
GLASS_EDGE = (18, 66, 40)
CAP = (178, 32, 36)
LABEL = (241, 232, 204)
INK = (24, 24, 44)
LABEL_TEXT = ("FLUX", "ONE")
_PNG_EVERY = 12  # photos 5, 17, ... are PNG so the demo exercises both decoders
_SUPERSAMPLE = 3  # bottle drawn larger then reduced: anti-aliased edges without a renderer


def write_sample_photos(out_dir: Path, count: int = 24, seed: int = 0) -> list[Path]:
    """Write `count` photos to `out_dir` (bottle_000.jpg, ...) and return their paths in order."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths: list[Path] = []
    for index in range(count):
        size = PHOTO_SIZES[(index + seed) % len(PHOTO_SIZES)]
        photo = _photo(size, rng)
        if index % _PNG_EVERY == 5:
            path = out_dir / f"bottle_{index:03d}.png"
            photo.save(path, format="PNG")
        else:
            path = out_dir / f"bottle_{index:03d}.jpg"
            photo.save(path, format="JPEG", quality=92)
        paths.append(path)
    return paths


def _photo(size: tuple[int, int], rng: random.Random) -> Image.Image:
    width, height = size
    kind = rng.choice(("solid", "gradient", "table"))
    horizon = round(height * rng.uniform(0.62, 0.82))
    background = _background(size, kind, horizon, rng)

    bottle_h = round(height * rng.uniform(0.45, 0.78))
    bottle = _bottle(bottle_h).rotate(
        rng.uniform(-9.0, 9.0), resample=Image.Resampling.BICUBIC, expand=True
    )
    # Rotating premultiplied alpha keeps the transparent corners from bleeding dark fringes.
    bottle = bottle.convert("RGBA")
    slack_x = max(0, width - bottle.width)
    x = round(slack_x / 2 + rng.uniform(-0.4, 0.4) * slack_x)
    if kind == "table":
        # Stand it on the table, a little in front of the back edge.
        y = min(height - bottle.height, horizon + round(0.04 * height) - bottle.height)
        _shadow(background, (x, y + bottle.height), bottle.width)
    else:
        y = rng.randint(0, max(0, height - bottle.height))
    background.alpha_composite(bottle, (max(0, x), max(0, y)))

    photo = background.convert("RGB")
    return ImageEnhance.Brightness(photo).enhance(rng.uniform(0.85, 1.12))


def _background(size: tuple[int, int], kind: str, horizon: int, rng: random.Random) -> Image.Image:
    def colour(lo: int, hi: int) -> tuple[int, int, int]:
        return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))

    width, height = size
    if kind == "solid":
        return Image.new("RGBA", size, (*colour(150, 250), 255))
    if kind == "gradient":
        top = Image.new("RGBA", size, (*colour(170, 255), 255))
        bottom = Image.new("RGBA", size, (*colour(40, 140), 255))
        mask = Image.linear_gradient("L").resize(size, Image.Resampling.BILINEAR)
        return Image.composite(bottom, top, mask)
    wall, table = colour(170, 240), colour(90, 170)
    image = Image.new("RGBA", size, (*wall, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, horizon, width, height), fill=(*table, 255))
    edge = tuple(max(0, c - 45) for c in table)
    draw.line((0, horizon, width, horizon), fill=(*edge, 255), width=max(2, height // 160))
    return image


def _shadow(image: Image.Image, bottom_left: tuple[int, int], width: int) -> None:
    x, y = bottom_left
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).ellipse(
        (x - width * 0.1, y - width * 0.12, x + width * 1.25, y + width * 0.06), fill=(0, 0, 0, 70)
    )
    image.alpha_composite(overlay)


def _bottle(height: int) -> Image.Image:
    """An upright bottle `height` px tall on a transparent, premultiplied ("RGBa") layer."""
    s = _SUPERSAMPLE
    big_h = height * s
    big_w = round(big_h * 0.36)
    layer = Image.new("RGBA", (big_w, big_h), (*GLASS, 0))
    draw = ImageDraw.Draw(layer)
    edge = max(1, big_w // 60)

    def px(fx: float, fy: float) -> tuple[int, int]:
        return round(fx * big_w), round(fy * big_h)

    neck_l, neck_r = 0.33, 0.67
    draw.ellipse((*px(0.0, 0.22), *px(1.0, 0.50)), fill=GLASS, outline=GLASS_EDGE, width=edge)
    draw.rounded_rectangle(
        (*px(0.0, 0.36), *px(1.0, 1.0)),
        radius=round(0.1 * big_w),
        fill=GLASS,
        outline=GLASS_EDGE,
        width=edge,
    )
    draw.rectangle((*px(0.02, 0.36), *px(0.98, 0.42)), fill=GLASS)  # hide the seam
    draw.rectangle(
        (*px(neck_l, 0.07), *px(neck_r, 0.30)), fill=GLASS, outline=GLASS_EDGE, width=edge
    )
    draw.rounded_rectangle(
        (*px(neck_l - 0.04, 0.0), *px(neck_r + 0.04, 0.09)), radius=round(0.04 * big_w), fill=CAP
    )
    draw.rectangle((*px(0.14, 0.40), *px(0.22, 0.95)), fill=(120, 190, 150, 255))  # highlight

    label_box = (*px(0.06, 0.54), *px(0.94, 0.82))
    draw.rectangle(label_box, fill=LABEL, outline=INK, width=edge)
    _label_text(draw, label_box)

    small = layer.resize((round(big_w / s), height), Image.Resampling.LANCZOS)
    return small.convert("RGBa")


def _label_text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    box_w, box_h = right - left, bottom - top
    line_h = box_h * 0.36
    size = max(6, int(line_h))
    font = label_font(size)
    while size > 6:
        widths = [draw.textbbox((0, 0), line, font=font)[2] for line in LABEL_TEXT]
        if max(widths) <= box_w * 0.82:
            break
        size -= max(1, size // 12)
        font = label_font(size)
    centre_x = left + box_w / 2
    for row, line in enumerate(LABEL_TEXT):
        centre_y = top + box_h * (0.3 + 0.4 * row)
        draw.text((centre_x, centre_y), line, font=font, fill=INK, anchor="mm")
