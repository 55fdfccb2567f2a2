"""Captioning a folder of images into kohya-style caption sidecars (<stem>.txt next to <stem>.png)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageOps

from fluxlora.captioning.captioners.base import Captioner, PathCaptioner
from fluxlora.captioning.cleaning import check_position, check_style, clean_captions, validate_trigger
from fluxlora.captioning.defaults import DEFAULTS

CAPTION_SUFFIX = ".txt"


def caption_images(
    image_paths: Sequence[Path],
    captioner: Captioner,
    trigger: str,
    remove_phrases: Iterable[str] = (),
    position: str = DEFAULTS.trigger_position,
    batch_size: int = DEFAULTS.batch_size,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    style: str = DEFAULTS.style,
) -> dict[str, str]:
    """Caption images and clean the captions: {stem: caption}, in the order of image_paths.

    See generate_captions for batching, progress and stopping, and cleaning.clean_captions for the
    cleaning.
    """
    # Settings are checked before the (slow) captioner runs, so a bad request fails at once.
    trigger = validate_trigger(trigger)
    check_position(position)
    check_style(style)
    raw = generate_captions(image_paths, captioner, batch_size, progress, should_stop)
    return clean_captions(raw, trigger, remove_phrases, position, style).captions


def generate_captions(
    image_paths: Sequence[Path],
    captioner: Captioner,
    batch_size: int = DEFAULTS.batch_size,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, str]:
    """The captioner's raw captions: {stem: caption}, in the order of image_paths.

    Images are opened batch_size at a time, so memory stays flat however many there are; a
    captioner that reads files itself (a PathCaptioner, such as "import") gets the paths instead.
    progress(done, total) is called after each batch (and once with 0 before the first).
    should_stop() is checked before each batch; when it is true the captions made so far are
    returned (fewer than the images), and the caller, which knows whether it is cancelling or
    shutting down, decides what that means.
    """
    paths = [Path(p) for p in image_paths]
    _check_unique_stems(paths)
    raw = _caption_in_batches(paths, captioner, batch_size, progress, should_stop)
    return {path.stem: text for path, text in zip(paths, raw, strict=False)}


def generate_pair_captions(
    pairs: Sequence[tuple[Path, Path]],
    captioner: Captioner,
    batch_size: int = DEFAULTS.batch_size,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Descriptions of (before, after) image pairs: ({stem: before}, {stem: after}), keyed by the
    after image's stem, in the order of pairs.

    Both halves of a pair go through the captioner in the same batch (an odd batch_size above 1
    takes one image less), so the two are described by the same model state side by side;
    progress counts images, and a stop keeps only the pairs described whole.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    afters = [Path(after) for _, after in pairs]
    _check_unique_stems(afters)
    interleaved = [Path(path) for pair in pairs for path in pair]
    raw = _caption_in_batches(interleaved, captioner, max(batch_size - batch_size % 2, 1), progress, should_stop)
    done = len(raw) // 2
    before = {after.stem: raw[2 * i] for i, after in enumerate(afters[:done])}
    return before, {after.stem: raw[2 * i + 1] for i, after in enumerate(afters[:done])}


def _caption_in_batches(
    paths: Sequence[Path],
    captioner: Captioner,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> list[str]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    by_path = isinstance(captioner, PathCaptioner)
    total = len(paths)
    captions: list[str] = []
    if progress is not None:
        progress(0, total)
    for start in range(0, total, batch_size):
        if should_stop is not None and should_stop():
            break
        batch = paths[start : start + batch_size]
        raw = captioner.caption_paths(batch) if by_path else captioner.caption([_open_rgb(p) for p in batch])
        if len(raw) != len(batch):
            raise RuntimeError(
                f"captioner {captioner.name!r} returned {len(raw)} captions for {len(batch)} images"
            )
        captions.extend(raw)
        if progress is not None:
            progress(len(captions), total)
    return captions


def write_sidecars(captions: Mapping[str, str], out_dir: Path) -> list[Path]:
    """Write each caption to out_dir/<stem>.txt: UTF-8, one line, trailing newline."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, caption in captions.items():
        if not stem or stem in (".", "..") or "/" in stem or "\\" in stem:
            raise ValueError(f"caption key {stem!r} is not a file stem")
        path = out_dir / f"{stem}{CAPTION_SUFFIX}"
        # Trainers read the whole file as the caption; a stray newline would split it.
        path.write_text(" ".join(caption.split()) + "\n", encoding="utf-8")
        written.append(path)
    return written


def read_sidecars(directory: Path) -> dict[str, str]:
    """{stem: caption} for every <stem>.txt in directory, sorted by stem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"caption directory {str(directory)!r} does not exist")
    return {
        path.stem: " ".join(path.read_text(encoding="utf-8-sig").split())
        for path in sorted(directory.glob(f"*{CAPTION_SUFFIX}"))
        if path.is_file()
    }


def _check_unique_stems(paths: Sequence[Path]) -> None:
    # a.png and a.jpg would both want a.txt: one caption would silently overwrite the other.
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise ValueError(
                f"images {str(seen[path.stem])!r} and {str(path)!r} share the stem {path.stem!r}; "
                "each image needs its own <stem>.txt caption"
            )
        seen[path.stem] = path


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            # Transparency is the captioner's business (it knows what background suits it).
            return image.convert("RGBA") if _has_alpha(image) else image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"image {str(path)!r} cannot be read: {exc}") from exc


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
