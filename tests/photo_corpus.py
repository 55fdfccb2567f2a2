"""Photos and broken files the preprocessing tests build: what people really upload.

BAD_INPUTS is the bad-input corpus with each file's stated outcome; write_bad_inputs() writes it.
"""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def scene(size: tuple[int, int], seed: int) -> Image.Image:
    """A distinct, JPEG-friendly picture: a tinted gradient plus a few shapes placed by `seed`."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    base = np.broadcast_to(ramp, (height, width, 3)) * rng.uniform(0.3, 1.0, 3)
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x, y, x + width // 4, y + height // 4), fill=colour)
    return image


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: the shape of a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


# name -> (outcome, phrase): "kept" (phrase: a warning or ""), "rejected" (phrase in the reason),
# "duplicate" (phrase: the kept file), "near" (kept, in a near-duplicate group with the named file).
BAD_INPUTS: dict[str, tuple[str, str]] = {
    "good_1.jpg": ("kept", ""),
    "good_2.jpg": ("kept", ""),
    "good_3.png": ("kept", ""),
    "truncated.jpg": ("rejected", "truncated or corrupt"),
    "zero.jpg": ("rejected", "empty file"),
    "notes.jpg": ("rejected", "not an image"),
    "bomb.png": ("rejected", "too large"),
    "cmyk.jpg": ("kept", "CMYK"),
    "cutout.png": ("kept", "transparency flattened"),
    "deep16.png": ("kept", ""),
    "rotated.jpg": ("kept", ""),
    "good_1_copy.jpg": ("duplicate", "good_1.jpg"),
    "good_2_reencoded.jpg": ("near", "good_2.jpg"),
    "tiny.png": ("rejected", "too small"),
    "slip.zip": ("rejected", "unsafe path"),
    "album.zip/inside/zipped_1.jpg": ("kept", ""),
    "album.zip/inside/zipped_2.png": ("kept", ""),
}


def write_bad_inputs(folder: Path, size: tuple[int, int] = (320, 240)) -> Path:
    """Write BAD_INPUTS into `folder` (zips included) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    (folder / "good_1.jpg").write_bytes(jpeg_bytes(scene(size, 1), quality=92))
    (folder / "good_2.jpg").write_bytes(jpeg_bytes(scene(size, 2), quality=92))
    scene(size, 3).save(folder / "good_3.png")
    whole = jpeg_bytes(scene(size, 4))
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n")
    (folder / "bomb.png").write_bytes(png_header_claiming(30000, 30000))
    scene(size, 5).convert("CMYK").save(folder / "cmyk.jpg", "JPEG", quality=92)
    cutout = scene(size, 6).convert("RGBA")
    alpha = Image.new("L", size, 255)
    ImageDraw.Draw(alpha).rectangle((0, 0, width // 4, height // 4), fill=0)
    cutout.putalpha(alpha)
    cutout.save(folder / "cutout.png")
    grey16 = (np.asarray(scene(size, 7).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    scene(size, 8).save(folder / "rotated.jpg", "JPEG", exif=exif.tobytes(), quality=92)
    shutil.copyfile(folder / "good_1.jpg", folder / "good_1_copy.jpg")
    with Image.open(folder / "good_2.jpg") as original:
        original.save(folder / "good_2_reencoded.jpg", "JPEG", quality=40)
    scene((40, 30), 9).save(folder / "tiny.png")
    with zipfile.ZipFile(folder / "slip.zip", "w") as archive:
        archive.writestr("photos/fine.jpg", jpeg_bytes(scene(size, 10)))
        archive.writestr("../../outside.jpg", jpeg_bytes(scene(size, 11)))
    with zipfile.ZipFile(folder / "album.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inside/zipped_1.jpg", jpeg_bytes(scene(size, 12), quality=92))
        buffer = io.BytesIO()
        scene(size, 13).save(buffer, "PNG")
        archive.writestr("inside/zipped_2.png", buffer.getvalue())
    return folder


def zip_bomb(path: Path, inflated_bytes: int = 64 * 1024**2) -> Path:
    """A zip whose one member inflates from ~64 KB to `inflated_bytes` of zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("photo.bmp", "w", force_zip64=True) as member:
            chunk = bytes(1024**2)
            for _ in range(inflated_bytes // len(chunk)):
                member.write(chunk)
    return path
