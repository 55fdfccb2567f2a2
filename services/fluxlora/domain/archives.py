"""Unpacking an uploaded zip of photos without trusting it.

Everything is decided from the central directory before a byte is inflated: member names that
would land outside the archive's folder ("../", absolute paths, drive letters: "zip slip"), too
many members, and sizes (declared total, per member, and compression ratio: a zip bomb). Any of
those refuses the whole archive with a reason naming the member; a person fixes the zip once
instead of training on part of it.

Members are never written under their own names: each goes to dest/<index><suffix>, so no name
can reach outside dest whatever the checks above miss, and while copying the bytes are counted
against the declared size, so a lying header cannot inflate past the limits either.

A member that is not a photo (a folder, a macOS resource fork, a nested archive, an encrypted
or corrupt entry) is rejected on its own with a reason; the rest of the archive is used.
"""

from __future__ import annotations

import re
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fluxlora_api.shared.files import human_bytes

ARCHIVE_SUFFIXES = frozenset({".zip"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 20_000
    max_member_bytes: int = 512 * 1024**2
    """A 100 MP 16-bit TIFF is about 600 MB; anything bigger is not a training photo."""
    max_total_bytes: int = 32 * 1024**3
    max_ratio: int = 200
    """Photos barely compress (JPEG ~1.0x, PNG ~1-3x, BMP/TIFF ~2-10x); bombs reach 1000x+."""
    ratio_floor_bytes: int = 16 * 1024**2
    """Members smaller than this are not ratio-checked: a 1 MB flat BMP may compress 500x."""


class ArchiveRejected(Exception):
    """The whole archive is refused; `reason` is meant for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Expanded:
    files: list[tuple[str, Path]] = field(default_factory=list)
    """(source key, extracted path): the key is "<archive key>/<member name>"."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(source key, reason) for members that are not photos."""


def is_archive(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in ARCHIVE_SUFFIXES


def expand_archive(path: Path, dest: Path, archive_key: str, limits: ArchiveLimits | None = None,
                   keep: Callable[[str], bool] | None = None) -> Expanded:
    """Check and unpack the zip at `path` into `dest`, or raise ArchiveRejected saying why not.

    keep(member name): unpack only the members it accepts (the captioning service takes the caption
    files of an upload); the whole archive is checked all the same."""
    limits = limits or ArchiveLimits()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ArchiveRejected(f"not a readable zip archive ({exc}); re-create it with a zip tool") from exc
    with archive:
        infos = archive.infolist()
        _check_directory(infos, limits)
        dest.mkdir(parents=True, exist_ok=True)
        expanded = Expanded()
        seen: set[str] = set()
        total = 0
        for index, info in enumerate(infos):
            if info.is_dir():
                continue
            name = _normalised(info.filename)
            if keep is not None and not keep(name):
                continue
            key = f"{archive_key}/{name}"
            reason = _member_problem(info, name, seen)
            seen.add(name.lower())
            if reason:
                expanded.rejected.append((key, reason))
                continue
            target = dest / f"{index:06d}{PurePosixPath(name).suffix.lower()}"
            try:
                total += _copy_member(archive, info, target, limits, total)
            except (zipfile.BadZipFile, EOFError) as exc:
                target.unlink(missing_ok=True)
                expanded.rejected.append((key, f"corrupt inside the archive ({exc})"))
                continue
            except (RuntimeError, NotImplementedError, zipfile.LargeZipFile) as exc:
                target.unlink(missing_ok=True)
                expanded.rejected.append((key, f"cannot be unpacked ({exc})"))
                continue
            expanded.files.append((key, target))
    return expanded


def _check_directory(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    if len(infos) > limits.max_members:
        raise ArchiveRejected(
            f"holds {len(infos)} entries, more than the limit of {limits.max_members}; split it into smaller zips"
        )
    total = 0
    for info in infos:
        problem = _unsafe_name(info.filename)
        if problem:
            raise ArchiveRejected(
                f"unsafe path '{info.filename}' in the archive ({problem}): every entry must stay inside "
                "the archive's folder. Re-create the zip from the folder of photos"
            )
        if info.is_dir():
            continue
        if info.file_size > limits.max_member_bytes:
            raise ArchiveRejected(
                f"{info.filename!r} unpacks to {human_bytes(info.file_size)}, over the per-file limit of "
                f"{human_bytes(limits.max_member_bytes)}; photos that large must be downscaled first"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= limits.ratio_floor_bytes and ratio > limits.max_ratio:
            raise ArchiveRejected(
                f"{info.filename!r} would inflate {ratio:.0f}x ({human_bytes(info.compress_size)} to "
                f"{human_bytes(info.file_size)}): a zip bomb, not photos"
            )
        total += info.file_size
    if total > limits.max_total_bytes:
        raise ArchiveRejected(
            f"unpacks to {human_bytes(total)}, over the limit of {human_bytes(limits.max_total_bytes)}; "
            "split it into smaller zips"
        )


def _unsafe_name(name: str) -> str:
    if "\0" in name:
        return "a NUL character in the name"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        return "an absolute path"
    if ".." in unified.split("/"):
        return "'..' climbs out of the archive"
    return ""


def _normalised(name: str) -> str:
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    return "/".join(parts)


def _member_problem(info: zipfile.ZipInfo, name: str, seen: set[str]) -> str:
    parts = PurePosixPath(name).parts
    if not parts:
        return "an entry without a name"
    if parts[0] == "__MACOSX" or parts[-1].startswith("._"):
        return "macOS metadata (a resource fork), not a photo"
    if info.flag_bits & 0x1:
        return "password-protected in the archive; zip the photos without a password"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link, not a photo"
    if PurePosixPath(name).suffix.lower() in ARCHIVE_SUFFIXES:
        return "an archive inside the archive; unpack it and upload its photos instead"
    if name.lower() in seen:
        return "appears twice in the archive; the first copy was used"
    return ""


def _copy_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limits: ArchiveLimits, total: int
) -> int:
    written = 0
    with archive.open(info) as source, target.open("wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            # The directory check trusted declared sizes; these hold whatever the header says.
            if written > max(info.file_size, 0) or written > limits.max_member_bytes:
                raise zipfile.BadZipFile(f"inflates past its declared size of {info.file_size} bytes")
            if total + written > limits.max_total_bytes:
                limit = human_bytes(limits.max_total_bytes)
                raise ArchiveRejected(f"unpacks to more than {limit}; split it into smaller zips")
            out.write(chunk)
    return written
