"""Which local folder each upload came from, so what the servers say about "the uploaded folder"
can name the user's own folder.

The preprocessing service names uploaded files by their path relative to the upload (which is
the user's relative path inside the folder they uploaded) and the upload itself as "the uploaded
folder": it never sees the local path. FluxloraClient.upload_photos records the folder here for
the life of the process; `localize` puts it back into a message, `local_path` gives the local
file behind a source key (e.g. for a rejected file in a report).
"""

from __future__ import annotations

from pathlib import Path

UPLOADED_FOLDER = "the uploaded folder"
_folders: dict[str, Path] = {}


def remember(prefix: str, folder: str | Path) -> None:
    """Record that upload `prefix` ("uploads/u-.../") holds the files of local `folder`."""
    _folders[prefix] = Path(folder).resolve()


def local_folder(prefix: str) -> Path | None:
    """The local folder uploaded under `prefix` by this process, or None."""
    return _folders.get(prefix)


def local_path(prefix: str, source_key: str) -> Path | None:
    """The local file behind a source key of upload `prefix` (files inside a zip: the zip), or None."""
    folder = _folders.get(prefix)
    if folder is None:
        return None
    path = folder / source_key
    for parent in (path, *path.parents):
        if parent == folder:
            break
        if parent.suffix.lower() == ".zip" and parent.is_file():
            return parent
    return path


def localize(message: str, prefix: str) -> str:
    """`message` with "the uploaded folder" (and the raw prefix, if it appears) replaced by the local
    folder it came from; unchanged when this process did not upload `prefix`."""
    folder = _folders.get(prefix)
    if folder is None:
        return message
    return message.replace(UPLOADED_FOLDER, f"your folder {folder}").replace(prefix, f"{folder}/")
