"""The "import" captioner: captions a person already has, matched to the images by file name.

Reads every caption file in a directory (recursively):
- <name>.txt: kohya-style sidecars, the whole file is the caption of the image named <name>;
- *.csv: rows of file,caption (a header row naming the columns, such as file,caption or
  image,text, is recognised and skipped);
- *.jsonl: one {"file": ..., "caption": ...} object per line ("image"/"file_name" and "text" too).

A caption file names an image with or without its extension and folders ("img1", "img1.jpg",
"photos/img1.jpg"). An image is matched by its dataset stem or by any name it was uploaded under
(its aliases: the source keys preprocessing recorded), the longest path match first.

Caption files inside an uploaded zip (unpack_caption_files) sit under the zip's name, as the
photos inside it are named ("photos.zip/sub/img1"); they also caption photos uploaded beside the
zip, by their path inside it ("sub/img1"), when no caption file outside names those photos.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from PIL import Image

CAPTION_SUFFIXES = (".txt", ".csv", ".jsonl")
_FILE_COLUMNS = ("file", "file_name", "filename", "image", "image_file", "path", "name", "stem")
_TEXT_COLUMNS = ("caption", "text", "prompt", "description")


class ImportCaptioner:
    name = "import"

    def __init__(
        self,
        model_dir: Path | None,
        *,
        task: str = "",
        batch_size: int = 8,
        max_new_tokens: int = 64,
        device: str = "auto",
        aliases: Mapping[str, Sequence[str]] | None = None,
        archives: Sequence[str] = (),
    ):
        if model_dir is None or not Path(model_dir).is_dir():
            raise FileNotFoundError(
                f"the import captioner needs a directory of caption files ({', '.join(CAPTION_SUFFIXES)}); "
                f"{str(model_dir)!r} is not one"
            )
        self.entries = read_caption_files(Path(model_dir))
        if not self.entries:
            raise ValueError(
                f"no captions found in {', '.join(CAPTION_SUFFIXES)} files under the import source: upload "
                "<image name>.txt sidecars, a captions.csv (file,caption) or a captions.jsonl "
                "({\"file\", \"caption\"}), or a zip holding them"
            )
        self.aliases = {stem: list(names) for stem, names in (aliases or {}).items()}
        # {path inside a zip: entry}; None where two zips hold the same path (only their full names match)
        self.in_archives: dict[str, str | None] = {}
        for archive in archives:
            prefix = archive.replace("\\", "/").strip("/").lower() + "/"
            for key in self.entries:
                if key.startswith(prefix):
                    inner = key[len(prefix):]
                    self.in_archives[inner] = None if inner in self.in_archives else key
        self.used: set[str] = set()

    @property
    def settings(self) -> dict[str, object]:
        return {"kind": self.name, "entries": len(self.entries)}

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        raise TypeError("the import captioner matches captions to images by file name: call caption_paths")

    def caption_paths(self, paths: Sequence[Path]) -> list[str]:
        captions, missing = [], []
        for path in paths:
            name = self._match(Path(path).stem)
            if name is None:
                missing.append(Path(path).stem)
            else:
                self.used.add(name)
                captions.append(self.entries[name].text)
        if missing:
            raise ValueError(
                f"no imported caption for image(s) {', '.join(sorted(missing))}: add them to the caption "
                "files (by the photo's file name) or caption those images another way"
            )
        return captions

    def unmatched(self) -> list[str]:
        """Caption entries no image asked for (photos preprocessing dropped, or misspelt names)."""
        return sorted(f"{self.entries[n].origin} ({n})" for n in self.entries if n not in self.used)

    def _match(self, stem: str) -> str | None:
        candidates = sorted(
            {_name_key(a) for a in self.aliases.get(stem, [])} | {stem.lower()}, key=len, reverse=True
        )
        for candidate in candidates:
            # "uploads/u-1/photos/img1" matches an entry "photos/img1" or "img1": the longest wins.
            parts = candidate.split("/")
            for start in range(len(parts)):
                suffix = "/".join(parts[start:])
                if suffix in self.entries:
                    return suffix
                if self.in_archives.get(suffix):
                    return self.in_archives[suffix]
        return None


def unpack_caption_files(zip_path: Path, root: Path, archive_key: str) -> list[str]:
    """Write the caption files inside an uploaded zip to root/<archive_key>/<name in the zip> (a
    sidecar's name says which image it captions) and return those paths relative to root. The zip
    is checked as preprocessing checks uploads (unsafe names, zip bombs); ValueError says why not."""
    from fluxlora.domain.archives import ArchiveRejected, expand_archive

    root = Path(root)
    with tempfile.TemporaryDirectory(prefix="fluxlora-zip-captions-") as tmp:
        try:
            expanded = expand_archive(Path(zip_path), Path(tmp), archive_key,
                                      keep=lambda name: name.lower().endswith(CAPTION_SUFFIXES))
        except ArchiveRejected as exc:
            raise ValueError(f"zip {archive_key!r} refused: {exc.reason}") from None
        written = []
        for key, path in expanded.files:
            target = root / key
            # expand_archive refused '..' and absolute names already; never write outside root regardless
            if not target.resolve().is_relative_to(root.resolve()):
                raise ValueError(f"zip {archive_key!r}: member {key!r} would land outside its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
            written.append(key)
    return written


class Entry:
    __slots__ = ("text", "origin")

    def __init__(self, text: str, origin: str):
        self.text = text
        self.origin = origin


def read_caption_files(root: Path) -> dict[str, Entry]:
    """{image name key: Entry} from every caption file under root; ValueError naming the file and
    line for an unreadable row or a caption given twice."""
    root = Path(root)
    entries: dict[str, Entry] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in CAPTION_SUFFIXES):
        relative = path.relative_to(root).as_posix()
        text = _read_text(path, relative)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            rows = [(relative, " ".join(text.split()), relative)]
        elif suffix == ".csv":
            rows = _csv_rows(text, relative)
        else:
            rows = _jsonl_rows(text, relative)
        for name, caption, origin in rows:
            key = _name_key(name)
            if not key:
                raise ValueError(f"{origin}: the file name is empty")
            if key in entries:
                raise ValueError(
                    f"two captions for image {key!r}: {entries[key].origin} and {origin}; keep one"
                )
            entries[key] = Entry(caption, origin)
    return entries


def _name_key(name: str) -> str:
    """"Photos/IMG1.jpg" -> "photos/img1": case and extension do not decide a match."""
    path = PurePosixPath(name.strip().replace("\\", "/").lstrip("./"))
    stem = path.name.rsplit(".", 1)[0] if "." in path.name.lstrip(".") else path.name
    return str(path.with_name(stem)).lower() if stem else ""


def _read_text(path: Path, relative: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption file {relative!r} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None


def _csv_rows(text: str, relative: str) -> list[tuple[str, str, str]]:
    rows = list(csv.reader(io.StringIO(text)))
    file_col, text_col, start, width = 0, 1, 0, 2
    if rows:
        header = [c.strip().lower() for c in rows[0]]
        if any(c in _FILE_COLUMNS for c in header) and any(c in _TEXT_COLUMNS for c in header):
            file_col = next(i for i, c in enumerate(header) if c in _FILE_COLUMNS)
            text_col = next(i for i, c in enumerate(header) if c in _TEXT_COLUMNS)
            start, width = 1, len(header)
    # A caption written without quotes spills its commas into extra cells: when the caption is the
    # last column, those cells are the rest of it, not columns to drop.
    spills = text_col == width - 1
    out = []
    for number, row in enumerate(rows[start:], start + 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(file_col, text_col):
            raise ValueError(
                f"{relative} line {number}: expected file,caption, got {len(row)} column(s)"
            )
        text_cells = row[text_col:] if spills else [row[text_col]]
        out.append((row[file_col], " ".join(",".join(text_cells).split()), f"{relative} line {number}"))
    return out


def _jsonl_rows(text: str, relative: str) -> list[tuple[str, str, str]]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{relative} line {number}: not JSON ({exc.msg})") from None
        item = item if isinstance(item, dict) else {}
        name = next((item[k] for k in _FILE_COLUMNS if isinstance(item.get(k), str)), None)
        caption = next((item[k] for k in _TEXT_COLUMNS if isinstance(item.get(k), str)), None)
        if name is None or caption is None:
            raise ValueError(f'{relative} line {number}: expected {{"file": "...", "caption": "..."}}')
        out.append((name, " ".join(caption.split()), f"{relative} line {number}"))
    return out
