"""The artifact store: the same keys and behaviour on the local-directory and S3 backends."""

from __future__ import annotations

import hashlib

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora_api.shared.errors import InvalidArgument, NotFound, Unavailable


def test_put_and_get_file_round_trip_with_size_and_sha256(store, tmp_path):
    data = bytes(range(256)) * 5000  # > 1 MiB so chunked streaming is exercised
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    info = store.put_file("runs/r1/checkpoints/step-000001/lora.safetensors", src)
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    out = store.get_file(info.key, tmp_path / "out" / "lora.safetensors")
    assert out.read_bytes() == data
    assert store.stat(info.key).size == len(data)


def test_list_is_recursive_sorted_and_matches_partial_prefixes(store):
    for key in ["jobs/training/b.json", "jobs/training/a.json", "jobs/preprocessing/x.json", "other/y"]:
        store.put_bytes(key, b"{}")
    assert [o.key for o in store.list("jobs/training/")] == ["jobs/training/a.json", "jobs/training/b.json"]
    assert [o.key for o in store.list("jobs/pre")] == ["jobs/preprocessing/x.json"]
    assert list(store.list("nothing/here/")) == []


def test_missing_object_is_not_found_naming_the_key(store, tmp_path):
    with pytest.raises(NotFound, match="datasets/missing/manifest.json"):
        store.get_file("datasets/missing/manifest.json", tmp_path / "x")
    assert not store.exists("datasets/missing/manifest.json")


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../escape", "a/../../b", "a\\b", "a/./b", "a//b",
                                 "uploads/" + "a" * 300, "k/" * 600])
def test_keys_cannot_escape_the_bucket(store, key):
    with pytest.raises(InvalidArgument):
        store.put_bytes(key, b"x")


def test_upload_dir_and_download_prefix_keep_relative_paths(store, tmp_path):
    src = tmp_path / "dir"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.png").write_bytes(b"png")
    store.upload_dir(src, "datasets/d1/images")
    paths = store.download_prefix("datasets/d1/images/", tmp_path / "back")
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in paths) == ["a.txt", "sub/b.png"]
    assert store.get_json is not None and store.get_bytes("datasets/d1/images/a.txt") == b"a"


def test_json_helpers(store):
    store.put_json("x/report.json", {"b": 1, "a": [1, 2]})
    assert store.get_json("x/report.json") == {"a": [1, 2], "b": 1}


def test_local_store_never_leaves_a_half_written_object(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("k/obj", b"old")
    unreadable = tmp_path / "a-directory"
    unreadable.mkdir()
    with pytest.raises(IsADirectoryError):
        store.put_file("k/obj", unreadable)
    assert store.get_bytes("k/obj") == b"old"
    assert sorted(p.name for p in (tmp_path / "store" / "k").iterdir()) == ["obj"]


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_a_lost_bucket_is_unavailable_not_a_missing_object(store):
    """Every key of a deleted bucket would read as missing: a job that exists must not be answered
    NOT_FOUND while its bucket is gone, so a read says UNAVAILABLE and names the bucket."""
    store.put_json("jobs/preprocessing/pre-1.json", {"state": "JOB_STATE_RUNNING"})
    store.delete("jobs/preprocessing/pre-1.json")
    store.client.remove_bucket(store.bucket)
    with pytest.raises(Unavailable) as lost:
        store.get_json("jobs/preprocessing/pre-1.json")
    assert "NoSuchBucket" in lost.value.message and store.bucket in lost.value.message
    store.client.make_bucket(store.bucket)
    with pytest.raises(NotFound):  # the bucket back: a missing object is NOT_FOUND again
        store.get_json("jobs/preprocessing/pre-1.json")
