"""Two captioning replicas writing one dataset's caption versions at once, on both store backends:
every version gets its own number, none is overwritten, and an edit made from a version that is no
longer the latest is made again on top of the newer one instead of undoing it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fluxlora.captioning import review
from fluxlora.common.storage import LocalStore, S3Store
from fluxlora.domain.caption_versions import CaptionVersions, HeadMoved

DATASET = "ds-0123456789ab"
WRITER = Path(__file__).with_name("caption_version_writer.py")


def another_client(store):
    """A second client of the same store, as another replica would have."""
    if isinstance(store, LocalStore):
        return LocalStore(store.root)
    return S3Store.connect(store.endpoint, store.bucket, "test", "test", secure=False)


def store_uri(store) -> str:
    return str(store.root) if isinstance(store, LocalStore) else f"s3://{store.bucket}@{store.endpoint}"


def test_create_only_writes_refuse_a_key_that_exists(store) -> None:
    assert store.create_bytes("claims/v0001.json", b"first") is True
    assert another_client(store).create_bytes("claims/v0001.json", b"second") is False
    assert store.get_bytes("claims/v0001.json") == b"first"
    # the same bytes again is what a retried write whose answer was lost sees: it did store them
    assert another_client(store).create_bytes("claims/v0001.json", b"first") is True
    assert [o.key for o in store.list("claims/")] == ["claims/v0001.json"]


def racing(store, monkeypatch, before_first_write):
    """store, whose first create-only write runs before_first_write() just before it: another replica
    storing a version after this one has picked its number."""
    real = store.create_bytes
    raced = []

    def create_bytes(key, data, content_type="application/octet-stream"):
        if not raced:
            raced.append(key)
            before_first_write()
        return real(key, data, content_type)

    monkeypatch.setattr(store, "create_bytes", create_bytes)
    return raced


def png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return buffer.getvalue()


def add(versions: CaptionVersions, writer: str):
    return versions.append(parent=0, kind="approve", trigger_word="ohwx", approved=True, author=writer,
                           captions={"img-1": f"ohwx, by {writer}"})


def test_a_replica_that_loses_the_race_for_a_number_takes_the_next(store, monkeypatch) -> None:
    ours, theirs = CaptionVersions(store, DATASET), CaptionVersions(another_client(store), DATASET)
    add(ours, "first")
    raced = racing(store, monkeypatch, lambda: add(theirs, "other replica"))
    mine = add(ours, "this replica")
    assert raced == [f"datasets/{DATASET}/captions/v0002.json"]  # both picked 2 ...
    assert mine.version == 3  # ... the other replica stored it first
    stored = {v.version: (v.author, v.captions["img-1"]) for v in CaptionVersions(store, DATASET).history()}
    assert stored == {1: ("first", "ohwx, by first"), 2: ("other replica", "ohwx, by other replica"),
                      3: ("this replica", "ohwx, by this replica")}


def test_an_edit_made_while_another_replica_stores_a_version_keeps_both_changes(store, monkeypatch) -> None:
    for stem in ("img-1", "img-2"):
        store.put_bytes(f"datasets/{DATASET}/images/{stem}.png", png())
    store.put_json(f"datasets/{DATASET}/manifest.json", {"images": []})
    CaptionVersions(store, DATASET).append(parent=0, kind="auto", trigger_word="ohwx",
                                           captions={"img-1": "ohwx, a bottle", "img-2": "ohwx, a bottle"})
    other = another_client(store)
    racing(store, monkeypatch, lambda: review.edit_captions(other, DATASET, {"img-2": "ohwx, a glass bottle"},
                                                             author="bo"))
    change = review.edit_captions(store, DATASET, {"img-1": "ohwx, a green bottle"}, author="ana")
    latest = CaptionVersions(store, DATASET).head()
    assert (change.version.version, latest.version, latest.author) == (3, 3, "ana")
    assert latest.captions["img-1"] == "ohwx, a green bottle"
    assert latest.captions["img-2"] == "ohwx, a glass bottle"  # bo's edit (version 2) is not undone
    assert latest.parent == 2 and latest.changed_stems == ["img-1"]


def test_a_change_that_must_follow_a_version_is_refused_when_another_got_in_first(store) -> None:
    versions = CaptionVersions(store, DATASET)
    add(versions, "first")
    add(CaptionVersions(another_client(store), DATASET), "second")
    with pytest.raises(HeadMoved, match="got caption version 2 while this change was made from version 1"):
        versions.append(parent=1, kind="edit", trigger_word="ohwx", captions={"img-1": "ohwx"}, expect_head=1)
    assert versions.numbers() == [1, 2]


def test_two_processes_appending_at_once_never_share_or_overwrite_a_version(store, tmp_path) -> None:
    count = 10
    go = tmp_path / "go"
    writers = [
        subprocess.Popen([sys.executable, str(WRITER), store_uri(store), DATASET, name, str(count), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("replica-a", "replica-b")
    ]
    go.touch()
    got = {}
    for name, process in zip(("replica-a", "replica-b"), writers, strict=True):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        got[name] = [int(line) for line in out.split()]
    assert sorted(got["replica-a"] + got["replica-b"]) == list(range(1, 2 * count + 1))
    versions = CaptionVersions(store, DATASET)
    for name, numbers in got.items():
        # each number a writer was given holds that writer's caption, in the order it wrote them
        assert [versions.get(n).captions["img-1"] for n in numbers] == [f"ohwx, {name} {i}" for i in range(count)]
