"""The SDK maps "the uploaded folder" and source keys back to the user's local folder."""

from __future__ import annotations

import zipfile

from fluxlora_client import uploads


def test_messages_and_keys_name_the_local_folder(tmp_path):
    prefix = "uploads/u-00112233445566778899/"
    folder = tmp_path / "my photos"
    (folder / "trip").mkdir(parents=True)
    with zipfile.ZipFile(folder / "album.zip", "w") as archive:
        archive.writestr("inside/a.jpg", b"x")
    message = "the uploaded folder holds 3 files but no images or zips (expected .jpg), e.g. 'notes.txt'"
    assert uploads.localize(message, prefix) == message  # not uploaded by this process: unchanged
    assert uploads.local_path(prefix, "trip/a.jpg") is None

    uploads.remember(prefix, folder)
    local = folder.resolve()
    assert uploads.localize(message, prefix) == f"your folder {local} holds 3 files but no images or zips " \
                                                "(expected .jpg), e.g. 'notes.txt'"
    assert uploads.localize(f"no files under {prefix!r}", prefix) == f"no files under '{local}/'"
    assert uploads.local_folder(prefix) == local
    assert uploads.local_path(prefix, "trip/a.jpg") == local / "trip" / "a.jpg"
    assert uploads.local_path(prefix, "album.zip/inside/a.jpg") == local / "album.zip"
