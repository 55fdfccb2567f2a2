"""Uploaded zips are unpacked only when safe: unsafe paths and bombs refuse the whole archive
before anything is written, and members that are not photos are rejected one by one."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest

from fluxlora.domain.archives import ArchiveLimits, ArchiveRejected, expand_archive, is_archive
from photo_corpus import jpeg_bytes, scene, zip_bomb


def make_zip(path, members, compression=zipfile.ZIP_DEFLATED):
    """members: {name: bytes} or {name: (bytes, ZipInfo tweaks)}."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if isinstance(data, tuple):
                data, tweaks = data
                for attr, value in tweaks.items():
                    setattr(info, attr, value)
            archive.writestr(info, data)
    return path


def mark_encrypted(path, name):
    """Set the "encrypted" bit of `name` in the central directory (zipfile cannot write one)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_length = int.from_bytes(data[at + 28 : at + 30], "little")
        if data[at + 46 : at + 46 + name_length] == name.encode():
            data[at + 8] |= 0x1
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


@pytest.fixture
def photo():
    return jpeg_bytes(scene((200, 150), 1))


def test_a_clean_zip_unpacks_every_photo_under_its_archive_key(tmp_path, photo):
    png = io.BytesIO()
    scene((120, 90), 2).save(png, "PNG")
    members = {"trip/a.jpg": photo, "trip/day 2/b.png": png.getvalue(), "c.jpg": photo}
    archive = make_zip(tmp_path / "album.zip", members)
    expanded = expand_archive(archive, tmp_path / "out", "uploads/u-1/album.zip")
    assert expanded.rejected == []
    found = {key: path.read_bytes() for key, path in expanded.files}
    assert found == {
        "uploads/u-1/album.zip/trip/a.jpg": photo,
        "uploads/u-1/album.zip/trip/day 2/b.png": png.getvalue(),
        "uploads/u-1/album.zip/c.jpg": photo,
    }
    # names on disk are indices: nothing from the archive chooses a path
    assert all(path.parent == tmp_path / "out" and path.stem.isdigit() for _, path in expanded.files)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../../etc/cron.d/evil.jpg", "'..' climbs out"),
        ("photos/../../evil.jpg", "'..' climbs out"),
        ("..\\..\\evil.jpg", "'..' climbs out"),
        ("/etc/passwd.jpg", "absolute path"),
        ("C:\\Windows\\evil.jpg", "absolute path"),
    ],
)
def test_zip_slip_refuses_the_whole_archive_before_writing(tmp_path, photo, name, why):
    archive = make_zip(tmp_path / "slip.zip", {"fine.jpg": photo, name: photo})
    out = tmp_path / "sandbox" / "out"
    with pytest.raises(ArchiveRejected) as refused:
        expand_archive(archive, out, "slip.zip")
    assert name in refused.value.reason and why in refused.value.reason
    assert "Re-create the zip" in refused.value.reason
    assert not (tmp_path / "sandbox").exists()  # nothing unpacked, not even the safe member


def test_a_zip_bomb_is_refused_from_its_directory(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.zip", inflated_bytes=32 * 1024**2)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ArchiveRejected, match="zip bomb") as refused:
        expand_archive(bomb, tmp_path / "out", "bomb.zip")
    assert "photo.bmp" in refused.value.reason
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("limits", "phrase"),
    [
        (ArchiveLimits(max_members=2), "more than the limit of 2"),
        (ArchiveLimits(max_member_bytes=1000), "per-file limit"),
        (ArchiveLimits(max_total_bytes=5000), "over the limit"),
    ],
)
def test_size_and_count_limits_refuse_before_unpacking(tmp_path, photo, limits, phrase):
    archive = make_zip(tmp_path / "many.zip", {f"{i}.jpg": photo for i in range(3)})
    with pytest.raises(ArchiveRejected, match=phrase):
        expand_archive(archive, tmp_path / "out", "many.zip", limits)
    assert not (tmp_path / "out").exists()


def test_members_that_are_not_photos_are_rejected_one_by_one(tmp_path, photo):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as nested:
        nested.writestr("x.jpg", photo)
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = make_zip(
            tmp_path / "mixed.zip",
            {
                "good.jpg": photo,
                "__MACOSX/._good.jpg": b"\0\5\26\7",
                "more.zip": inner.getvalue(),
                "secret.jpg": photo,
                "link.jpg": (b"/etc/passwd", {"external_attr": (stat.S_IFLNK | 0o777) << 16}),
                "GOOD.JPG": photo,
                "folder/": b"",
            },
        )
        with zipfile.ZipFile(archive, "a") as again:
            again.writestr("good.jpg", b"a second entry with the same name")
    mark_encrypted(archive, "secret.jpg")
    expanded = expand_archive(archive, tmp_path / "out", "mixed.zip")
    assert [key for key, _ in expanded.files] == ["mixed.zip/good.jpg"]
    assert expanded.files[0][1].read_bytes() == photo
    reasons = dict(expanded.rejected)
    assert "macOS metadata" in reasons["mixed.zip/__MACOSX/._good.jpg"]
    assert "archive inside the archive" in reasons["mixed.zip/more.zip"]
    assert "password-protected" in reasons["mixed.zip/secret.jpg"]
    assert "symbolic link" in reasons["mixed.zip/link.jpg"]
    assert "appears twice" in reasons["mixed.zip/GOOD.JPG"]
    assert len(expanded.rejected) == 6  # the second "good.jpg" too; the folder entry is no file


def test_a_corrupt_member_is_rejected_and_the_rest_kept(tmp_path, photo):
    archive = make_zip(tmp_path / "crc.zip", {"a.jpg": photo, "b.jpg": photo}, compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    second = data.rfind(photo[:64])  # b.jpg's stored bytes
    data[second + 500] ^= 0xFF
    archive.write_bytes(bytes(data))
    expanded = expand_archive(archive, tmp_path / "out", "crc.zip")
    assert [key for key, _ in expanded.files] == ["crc.zip/a.jpg"]
    assert expanded.rejected == [("crc.zip/b.jpg", expanded.rejected[0][1])]
    assert "corrupt inside the archive" in expanded.rejected[0][1]
    assert len(list((tmp_path / "out").iterdir())) == 1  # the bad member's partial file is gone


def test_not_a_zip_is_refused_with_a_reason(tmp_path):
    fake = tmp_path / "photos.zip"
    fake.write_text("not a zip at all")
    with pytest.raises(ArchiveRejected, match="not a readable zip"):
        expand_archive(fake, tmp_path / "out", "photos.zip")


def test_is_archive():
    assert is_archive("uploads/u-1/Photos.ZIP") and not is_archive("a/zip.jpg")
