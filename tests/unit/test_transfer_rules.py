"""The pure rules of client transfers (fluxlora.common.transfers) and their store side on a local store:
which paths an upload may name, its content-addressed prefix, which keys a client may read, and that
only the declared bytes are ever stored."""

from __future__ import annotations

import hashlib

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora.common.transfers import (
    Transfers,
    declaration_key,
    declare,
    manifest_key,
    readable,
    upload_incomplete,
    upload_path,
    upload_prefix,
)
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


A, B = b"photo a", b"photo b, longer"
FILES = [("a.jpg", len(A), sha(A)), ("sub/b.jpg", len(B), sha(B))]


@pytest.mark.parametrize("path", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:/x.jpg", "a\\b.jpg", "./a.jpg",
                                  "a//b.jpg", "", "a/\x00.jpg"])
def test_an_upload_path_must_stay_under_its_prefix(path):
    with pytest.raises(InvalidArgument):
        upload_path(path)


def test_declarations_refuse_repeats_bad_hashes_and_negative_sizes():
    with pytest.raises(InvalidArgument, match="twice"):
        declare([FILES[0], FILES[0]])
    with pytest.raises(InvalidArgument, match="sha256"):
        declare([("a.jpg", 1, "ABC")])
    with pytest.raises(InvalidArgument, match="negative"):
        declare([("a.jpg", -1, sha(A))])
    with pytest.raises(InvalidArgument, match="at least one"):
        declare([])


def test_the_prefix_depends_on_paths_and_contents_only():
    prefix = upload_prefix(declare(FILES))
    assert prefix.startswith("uploads/u-") and prefix.endswith("/")
    assert upload_prefix(declare(reversed(FILES))) == prefix  # order does not matter
    assert upload_prefix(declare([FILES[0], ("sub/b.jpg", len(A), sha(A))])) != prefix  # contents do
    assert upload_prefix(declare([FILES[0], ("sub/b.jpg", len(B) + 1, sha(B))])) != prefix  # sizes do
    assert upload_prefix(declare([FILES[0], ("sub/c.jpg", len(B), sha(B))])) != prefix  # names do


@pytest.mark.parametrize("key", ["datasets/ds-1/images/a.png", "runs/trn-1/", "grids/g/grid.png", "generations/x/",
                                 "uploads/u-1/a.jpg", "datasets/"])
def test_what_a_client_may_read(key):
    assert readable(key) == key


@pytest.mark.parametrize("key", ["jobs/preprocessing/pre-1.json", "models/flux/", "cache/encodings/x.safetensors",
                                 "transfers/uploads/u-1/declared.json", "datasetsX/a", "", "runs"])
def test_what_a_client_may_not_read(key):
    with pytest.raises((PermissionDenied, InvalidArgument)):
        readable(key)


@pytest.mark.parametrize("key", ["../jobs/x.json", "/datasets/a.png", "datasets/../jobs/x.json"])
def test_malformed_keys_are_invalid_not_forbidden(key):
    with pytest.raises(InvalidArgument):
        readable(key)


@pytest.fixture
def transfers(tmp_path):
    return Transfers(LocalStore(tmp_path / "store"), max_upload_bytes=1000)


def test_the_local_store_streams_and_stores_only_the_declared_bytes(transfers):
    upload = transfers.create_upload(FILES)
    assert not upload.presigned and [t.path for t in upload.targets] == ["a.jpg", "sub/b.jpg"]
    assert all(t.url == "" for t in upload.targets)
    prefix = upload.prefix
    assert upload_incomplete(transfers.store, prefix)
    with pytest.raises(InvalidArgument, match="not the declared"):
        transfers.receive(prefix, "a.jpg", [b"photo A"])  # same size, other bytes
    with pytest.raises(InvalidArgument, match="longer"):
        transfers.receive(prefix, "a.jpg", [A, b"!"])
    with pytest.raises(InvalidArgument, match="not a file of upload"):
        transfers.receive(prefix, "c.jpg", [A])
    with pytest.raises(FailedPrecondition, match="CreateUpload first"):
        transfers.receive("uploads/u-" + "0" * 32 + "/", "a.jpg", [A])
    assert list(transfers.store.list(prefix)) == []
    transfers.receive(prefix, "a.jpg", [A[:3], A[3:]])
    with pytest.raises(FailedPrecondition, match="'sub/b.jpg' is missing"):
        transfers.complete(prefix)
    assert transfers.create_upload(FILES).targets[0].path == "sub/b.jpg"  # only what is missing
    transfers.receive(prefix, "sub/b.jpg", [B])
    assert transfers.complete(prefix) == (2, len(A) + len(B))
    assert not upload_incomplete(transfers.store, prefix)
    again = transfers.create_upload(FILES)
    assert again.complete and again.targets == [] and again.prefix == prefix
    assert sorted(o.key for o in transfers.store.list("")) == sorted(
        [prefix + "a.jpg", prefix + "sub/b.jpg", declaration_key(prefix), manifest_key(prefix)])


def test_completing_finds_and_deletes_an_object_that_differs(transfers):
    prefix = transfers.create_upload(FILES).prefix
    transfers.store.put_bytes(prefix + "a.jpg", b"photo A")  # right size, wrong bytes (as a bad PUT could)
    transfers.store.put_bytes(prefix + "sub/b.jpg", B)
    with pytest.raises(FailedPrecondition, match="'a.jpg' differs"):
        transfers.complete(prefix)
    assert not transfers.store.exists(prefix + "a.jpg") and upload_incomplete(transfers.store, prefix)


def test_an_upload_over_the_limit_is_refused_before_anything_is_declared(transfers):
    with pytest.raises(ResourceExhausted, match="FLUXLORA_MAX_UPLOAD_BYTES"):
        transfers.create_upload([("big.jpg", 1001, sha(b""))])
    assert list(transfers.store.list("")) == []


def test_a_prefix_no_upload_declared_is_not_incomplete(transfers):
    assert not upload_incomplete(transfers.store, "uploads/my-photos/")
    assert not upload_incomplete(transfers.store, "uploads/u-" + "1" * 32 + "/")


def test_listing_pages_and_downloading_a_readable_object(transfers):
    for i in range(5):
        transfers.store.put_bytes(f"runs/r/{i}.txt", str(i).encode())
    transfers.store.put_bytes("jobs/training/j.json", b"{}")
    first, token = transfers.list_artifacts("runs/r/", page_size=2)
    assert [a.info.key for a in first] == ["runs/r/0.txt", "runs/r/1.txt"] and all(a.url == "" for a in first)
    keys = [a.info.key for a in first]
    while token:
        page, token = transfers.list_artifacts("runs/r/", page_size=2, page_token=token)
        keys += [a.info.key for a in page]
    assert keys == [f"runs/r/{i}.txt" for i in range(5)]
    [one], _ = transfers.list_artifacts("runs/r/3.txt")
    assert one.info.size == 1
    size, chunks = transfers.download("runs/r/3.txt")
    assert size == 1 and b"".join(chunks) == b"3"
    with pytest.raises(PermissionDenied):
        transfers.download("jobs/training/j.json")
    with pytest.raises(PermissionDenied):
        transfers.list_artifacts("jobs/")
