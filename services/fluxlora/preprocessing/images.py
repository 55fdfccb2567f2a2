"""Decoding untrusted photos into plain sRGB images, and cropping them to a training size.

Uploaded files are untrusted: only a few raster formats are parsed (no EPS/PDF plugins that shell
out), the pixel count is capped before decoding, and every failure becomes an ImageRejected with
a reason a person can act on instead of a stack trace.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from fluxlora.preprocessing.framing import frame

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")
# 108 MP phone sensors and 100 MP medium-format backs pass; decoding the cap costs ~360 MB RGB.
MAX_IMAGE_PIXELS = 120_000_000
WHITE = (255, 255, 255)

# Pillow's own bomb check runs inside Image.open, before any of our code sees the size; aligning
# it with our cap keeps one limit for the whole process (it errors at twice this, warns above).
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_SUPPORTED = "JPEG, PNG, WebP, TIFF or BMP"

# Formats people commonly upload that we do not decode, so the reason can say what to do.
_KNOWN_UNSUPPORTED: tuple[tuple[bytes, int, str], ...] = (
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftyphevc", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"GIF8", 0, "GIF"),
    (b"%PDF", 0, "PDF"),
)


# Magic numbers of the formats we do decode: a file that starts like one yet cannot be opened is a
# variant the decoder does not handle (e.g. a planar multipage TIFF), not "not an image".
_OURS: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"WEBP", 8, "WebP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"II+\x00", 0, "BigTIFF"),
    (b"MM\x00+", 0, "BigTIFF"),
    (b"BM", 0, "BMP"),
)
_PLUGIN = {"WebP": "WEBP", "BigTIFF": "TIFF"}


class ImageRejected(Exception):
    """A file that cannot become a training image; `reason` is meant for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodedImage:
    """An RGB image plus what the pipeline may want to report about where it came from."""

    image: Image.Image
    source_format: str
    source_mode: str
    notes: list[str] = field(default_factory=list)


def load_image(
    path: Path | str,
    *,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode `path` into an upright RGB image, or raise ImageRejected saying why not."""
    return decode_image(path, background=background, max_pixels=max_pixels).image


def decode_image(
    path: Path | str,
    *,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> DecodedImage:
    """Like load_image, keeping the source format/mode and non-fatal notes for the manifest.

    `max_pixels` can only lower the cap: Pillow's process-wide check (set from
    MAX_IMAGE_PIXELS above) refuses bigger images before this code sees them.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageRejected("empty file (0 bytes)")
    except OSError as exc:
        raise ImageRejected(f"cannot read file ({exc.strerror or exc})") from exc

    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=list(FORMATS)) as opened:
                source_format = opened.format or "unknown"
                source_mode = opened.mode
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageRejected(_too_large(width, height, max_pixels))
                frames = getattr(opened, "n_frames", 1)
                if frames > 1 and source_format != "MPO":
                    notes.append(f"first of {frames} frames used")
                opened.load()
                image = _upright(opened, notes)
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(f"too large to decode safely; downscale it first ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise ImageRejected(_not_an_image(path)) from exc
        except Exception as exc:  # any decoder failure on untrusted bytes
            raise ImageRejected(f"could not be decoded: truncated or corrupt image data ({_describe(exc)})") from exc

    if image.width == 0 or image.height == 0:
        raise ImageRejected("image has no pixels")
    try:
        rgb = _to_rgb(image, background, notes)
    except Exception as exc:
        raise ImageRejected(f"unsupported colour mode {image.mode} ({_describe(exc)})") from exc
    rgb.info = {}  # nothing from the source (EXIF, ICC, text chunks) may leak into outputs
    return DecodedImage(rgb, source_format, source_mode, notes)


def fit_to(
    image: Image.Image, size: tuple[int, int]
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Centre-crop to the aspect of `size`, then Lanczos-resize to exactly `size`.

    Returns the result and the crop box (left, top, right, bottom) in the input's pixels; the
    box is whole pixels so that the manifest can say exactly what was kept.
    """
    fitted, framing = frame(image, size, "square")
    return fitted, framing.crop_box


def _upright(image: Image.Image, notes: list[str]) -> Image.Image:
    # In place: the loaded pixels are ours, and a copy of a 24 MP photo costs as much as a resize.
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block should not cost the photo
        notes.append(f"EXIF orientation unreadable, used as stored ({_describe(exc)})")
    return image


def _to_rgb(image: Image.Image, background: tuple[int, int, int], notes: list[str]) -> Image.Image:
    icc = image.info.get("icc_profile")
    mode = image.mode
    if mode == "CMYK":
        # Without the profile a CMYK->RGB conversion is a crude formula; with it, lcms does it.
        converted = _apply_icc(image, icc, notes) if icc else None
        if converted is not None:
            notes.append("converted from CMYK through its colour profile")
            return converted
        notes.append("converted from CMYK without a colour profile: colours may be off")
        return image.convert("RGB")
    if mode in _ALPHA_MODES or image.has_transparency_data:
        image = _flatten(image, background, notes)
    elif mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        image = _to_8bit(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if icc:
        converted = _apply_icc(image, icc, notes)
        if converted is not None:
            image = converted
    return image


def _flatten(image: Image.Image, background: tuple[int, int, int], notes: list[str]) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha_min, _ = rgba.getchannel("A").getextrema()
    if alpha_min == 255:
        return rgba.convert("RGB")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    base.alpha_composite(rgba)
    notes.append(f"transparency flattened onto background {tuple(background)}")
    return base.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips these modes at 255 instead of scaling, which turns almost
    # every 16-bit photo white.
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    elif image.mode == "I" and (not values.size or values.max() <= 255):
        scale = 1.0  # 32-bit container holding 8-bit data
    else:
        scale = 255.0 / 65535.0
    eight = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(eight, mode="L")


@lru_cache(maxsize=1)
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _apply_icc(image: Image.Image, icc: bytes, notes: list[str]) -> Image.Image | None:
    """Convert to sRGB through the embedded profile; None when it is sRGB already or unusable."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if space != image.mode:
            # e.g. a grey profile on a grey photo now in RGB: gamma differences are negligible.
            return None
        if space == "RGB" and "srgb" in ImageCms.getProfileDescription(profile).lower():
            return None
        converted = ImageCms.profileToProfile(image, profile, _srgb(), outputMode="RGB")
    except Exception as exc:  # noqa: BLE001 - a bad profile degrades colour, not the photo
        notes.append(f"embedded colour profile ignored ({_describe(exc)})")
        return None
    return converted


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return (
        f"too large: {width}x{height} is {width * height / 1e6:.0f} MP, the limit is "
        f"{max_pixels / 1e6:.0f} MP; downscale it first"
    )


def _not_an_image(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            head = fh.read(32)
    except OSError:
        head = b""
    for magic, offset, name in _KNOWN_UNSUPPORTED:
        if head[offset : offset + len(magic)] == magic:
            return f"{name} files are not supported; export the photo as {_SUPPORTED}"
    for magic, offset, name in _OURS:
        if head[offset : offset + len(magic)] == magic:
            return (
                f"could not be decoded: a {name} file the decoder cannot read ({_decoder_reason(path, name)}); "
                "open it in an image editor and save it again as JPEG or PNG"
            )
    return f"not an image in a supported format ({_SUPPORTED})"


def _decoder_reason(path: Path, name: str) -> str:
    """Why Pillow's plugin for `name` refuses the file: Image.open only says it cannot identify
    it (it tries every plugin and keeps no reason), so open it once more with that plugin alone."""
    factory = Image.OPEN.get(_PLUGIN.get(name, name), (None, None))[0]
    if factory is None:
        return "no reason given"
    try:
        with path.open("rb") as fh, factory(fh, str(path)) as opened:
            opened.load()
    except Exception as exc:  # noqa: BLE001 - we want the decoder's own words, whatever they are
        return _describe(exc)
    return "no reason given"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
