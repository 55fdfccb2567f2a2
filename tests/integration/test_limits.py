"""Limits on what one request may ask, through the SDK against real servers: upload bytes, caption
length (edit, find/replace, review import, caption import) and training steps. Each refusal is
INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message naming the field, the value, the limit and
the FLUXLORA_* setting that raises it, and nothing is stored for it."""

from __future__ import annotations

import threading
import zipfile

import pytest
from PIL import Image

from fluxlora.common.storage import LocalStore
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, FluxloraClientError, JobFailed
from fluxlora_client.review_page import EDITS_FORMAT
from support import preprocessing_server, put_photos, services_and_client

S = jobs_pb2.JobState
UPLOAD_LIMIT = 16 * 1024  # the four sample photos are ~60 KB; two flat 96x96 PNGs ~600 bytes
CAPTION_LIMIT = 200
STEPS_LIMIT = 500
TRIGGER = "fluxone"


def snapshot(store):
    return {(o.key, o.size) for o in store.list("")}


def refusal(call) -> FluxloraClientError:
    with pytest.raises(FluxloraClientError) as err:
        call()
    return err.value


def flat_photos(folder, count=2):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", (96, 96), (30 + 100 * k, 90, 200 - 60 * k)).save(folder / f"photo{k}.png")
    return folder


def preprocessed(client, folder) -> str:
    return client.result(client.wait(client.preprocess(client.upload_photos(folder), base_size=64))).dataset_id


@pytest.fixture
def limited(tmp_path):
    """The four servers on a local store, with small limits."""
    with services_and_client(LocalStore(tmp_path / "store"), tmp_path, max_upload_bytes=UPLOAD_LIMIT,
                             max_caption_chars=CAPTION_LIMIT, max_train_steps=STEPS_LIMIT) as client:
        yield client


@pytest.fixture
def captioned(limited, tmp_path):
    """A dataset of two photos with imported draft captions (version 1): (client, dataset_id, stems)."""
    folder = flat_photos(tmp_path / "photos")
    (folder / "captions.csv").write_text("file,caption\nphoto0.png,a red bottle\nphoto1.png,a blue bottle\n")
    dataset_id = preprocessed(limited, folder)
    limited.wait(limited.caption(dataset_id, TRIGGER, captioner="import"))
    stems = [e.stem for e in limited.captions.list(dataset_id).entries]
    assert len(stems) == 2
    return limited, dataset_id, stems


# --- upload size ------------------------------------------------------------------------------


def test_an_upload_over_the_limit_is_refused_at_submit_and_nothing_is_stored(limited, photos, tmp_path):
    total = sum(p.stat().st_size for p in photos.iterdir())
    before = snapshot(limited.store)
    err = refusal(lambda: limited.upload_photos(photos))  # this client sets no limit of its own: the server's decides
    assert err.code == "RESOURCE_EXHAUSTED" and f"({total} bytes)" in err.message
    assert f"({UPLOAD_LIMIT} bytes, FLUXLORA_MAX_UPLOAD_BYTES)" in err.message
    assert snapshot(limited.store) == before  # refused at CreateUpload, before a byte was sent

    # Photos that reached the store another way are checked again at submit.
    source = put_photos(limited.store, photos, "direct")
    before = snapshot(limited.store)
    err = refusal(lambda: limited.preprocess(source, base_size=64))
    assert err.code == "RESOURCE_EXHAUSTED"
    assert "the uploaded folder holds" in err.message and f"({total} bytes)" in err.message
    assert f"({UPLOAD_LIMIT} bytes, FLUXLORA_MAX_UPLOAD_BYTES)" in err.message
    assert "raise FLUXLORA_MAX_UPLOAD_BYTES" in err.message
    assert snapshot(limited.store) == before
    assert limited.list_jobs("preprocessing") == []

    # A zip counts by the bytes it takes in the store, like the photos would.
    archive = tmp_path / "zipped" / "photos.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(photos.iterdir()):
            zf.write(path, path.name)
    err = refusal(lambda: limited.upload_photos(archive))
    assert err.code == "RESOURCE_EXHAUSTED" and "holds 1 file of" in err.message
    assert "FLUXLORA_MAX_UPLOAD_BYTES" in err.message

    # Under the limit the same server takes it.
    small = limited.upload_photos(flat_photos(tmp_path / "small"))
    assert limited.wait(limited.preprocess(small, base_size=64)).state == S.JOB_STATE_SUCCEEDED


def test_the_sdk_refuses_an_oversized_upload_before_sending_a_byte(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("FLUXLORA_MAX_UPLOAD_BYTES", str(UPLOAD_LIMIT))
    with preprocessing_server(tmp_path) as server:  # its own limit is the default, far above the SDK's
        monkeypatch.setenv("FLUXLORA_PREPROCESSING_ADDR", server.address)
        with FluxloraClient.from_env() as client:
            assert client.max_upload_bytes == UPLOAD_LIMIT
            err = refusal(lambda: client.upload_photos(photos))
            assert err.code == "RESOURCE_EXHAUSTED" and str(photos) in err.message
            assert "4 files" in err.message and "FLUXLORA_MAX_UPLOAD_BYTES" in err.message
            assert list(server.store.list("")) == []
            assert client.upload_photos(flat_photos(tmp_path / "small")).startswith("uploads/")


def test_a_job_checks_the_upload_again_when_files_arrived_after_its_submit(tmp_path):
    gate = threading.Event()
    with preprocessing_server(tmp_path, gate=gate, max_upload_bytes=UPLOAD_LIMIT) as server, \
            FluxloraClient(preprocessing=server.address) as client:
        source = client.upload_photos(flat_photos(tmp_path / "photos"))
        job = client.preprocess(source, base_size=64)
        server.store.put_bytes(f"{source}late.bin", b"\0" * UPLOAD_LIMIT)  # the upload grew while queued
        gate.set()
        with pytest.raises(JobFailed) as failed:
            client.wait(job)
        assert failed.value.code == "RESOURCE_EXHAUSTED" and "FLUXLORA_MAX_UPLOAD_BYTES" in failed.value.message
        assert list(server.store.list("datasets/")) == []


# --- caption length ---------------------------------------------------------------------------


def test_an_edit_over_the_caption_limit_is_refused_and_stores_no_version(captioned):
    client, dataset_id, stems = captioned
    history = client.captions.history(dataset_id)
    long = f"{TRIGGER}, " + "x" * (CAPTION_LIMIT - len(TRIGGER) - 1)  # one character over
    err = refusal(lambda: client.captions.edit(dataset_id, {stems[0]: long}))
    assert err.code == "INVALID_ARGUMENT"
    assert f"captions: {stems[0]!r} is {CAPTION_LIMIT + 1} characters" in err.message
    assert f"the limit is {CAPTION_LIMIT} characters (FLUXLORA_MAX_CAPTION_CHARS)" in err.message
    assert client.captions.history(dataset_id) == history

    # The review page's import goes the same way.
    edits = {"format": EDITS_FORMAT, "dataset_id": dataset_id, "base_version": 1, "captions": {stems[1]: long}}
    err = refusal(lambda: client.captions.import_review(dataset_id, edits))
    assert err.code == "INVALID_ARGUMENT" and "FLUXLORA_MAX_CAPTION_CHARS" in err.message
    assert client.captions.history(dataset_id) == history

    # At the limit (whitespace collapsed, as stored) it is an ordinary edit.
    change = client.captions.edit(dataset_id, {stems[0]: "   " + long[:-1] + "\n\n"})
    assert change.created and len(client.captions.list(dataset_id).entries[0].caption) == CAPTION_LIMIT


def test_a_replace_that_is_too_long_or_makes_captions_too_long_is_refused(captioned):
    client, dataset_id, _ = captioned
    history = client.captions.history(dataset_id)
    for field, find, replace in [("replace", "bottle", "y" * (CAPTION_LIMIT + 1)),
                                 ("find", "b" * (CAPTION_LIMIT + 1), "jar")]:
        err = refusal(lambda f=find, r=replace: client.captions.replace(dataset_id, f, r))
        assert err.code == "INVALID_ARGUMENT"
        assert err.message.startswith(f"{field} is {CAPTION_LIMIT + 1} characters, over the limit of {CAPTION_LIMIT}")
    # Each word becomes 60 characters: a short replacement that grows every caption past the limit.
    for dry_run in (True, False):
        err = refusal(lambda d=dry_run: client.captions.replace(dataset_id, r"\w+", "z" * 60, regex=True, dry_run=d))
        assert err.code == "INVALID_ARGUMENT" and err.message.startswith("captions after the replace: ")
        assert "FLUXLORA_MAX_CAPTION_CHARS" in err.message
    assert client.captions.history(dataset_id) == history
    assert client.captions.replace(dataset_id, "bottle", "jar").created


def test_an_import_with_a_caption_over_the_limit_fails_and_stores_no_captions(limited, tmp_path):
    folder = flat_photos(tmp_path / "photos")
    (folder / "captions.csv").write_text(f"file,caption\nphoto0.png,a bottle\nphoto1.png,{'w' * 300}\n")
    dataset_id = preprocessed(limited, folder)
    before = snapshot(limited.store)
    with pytest.raises(JobFailed) as failed:
        limited.wait(limited.caption(dataset_id, TRIGGER, captioner="import"))
    assert failed.value.code == "INVALID_ARGUMENT"
    assert "imported captions" in failed.value.message and "FLUXLORA_MAX_CAPTION_CHARS" in failed.value.message
    assert "characters" in failed.value.message
    after = snapshot(limited.store)
    assert {key for key, _ in after - before} <= {k for k, _ in after if k.startswith("jobs/")}


# --- training steps ---------------------------------------------------------------------------


def test_a_run_over_the_step_limit_is_refused_at_submit(captioned):
    client, dataset_id, _ = captioned
    err = refusal(lambda: client.train(dataset_id, max_steps=STEPS_LIMIT + 1))
    assert err.code == "INVALID_ARGUMENT"
    assert err.message.startswith(f"spec.max_steps is {STEPS_LIMIT + 1}, over the limit of {STEPS_LIMIT} "
                                  "(FLUXLORA_MAX_TRAIN_STEPS)")
    assert client.list_jobs("training") == []
    # At the limit the steps are not what stops it (this server has no base model configured).
    err = refusal(lambda: client.train(dataset_id, max_steps=STEPS_LIMIT))
    assert "max_steps" not in err.message


# --- every numeric spec field ------------------------------------------------------------------
@pytest.mark.parametrize("submit, field, shown, bound", [
    (lambda c: c.train("ds-x", sample_steps=10**9), "spec.sample_steps", "1000000000", "[0, 500]"),
    (lambda c: c.train("ds-x", guidance=float("nan")), "spec.guidance", "nan", "[0, 100]"),
    (lambda c: c.preprocess("uploads/u-x/", base_size=10**6), "spec.base_size", "1000000", "[0, 4096]"),
    (lambda c: c.caption("ds-x", TRIGGER, max_new_tokens=10**6), "spec.max_new_tokens", "1000000", "[0, 512]"),
    (lambda c: c.evaluate("trn-x", guidance=float("nan")), "spec.guidance", "nan", "[0, 100]"),
    (lambda c: c.generate("a photo", width=10**6), "spec.width", "1000000", "[0, 4096]"),
    (lambda c: c.generate("a photo", guidance=float("inf")), "spec.guidance", "inf", "[0, 100]"),
])
def test_a_number_out_of_its_range_is_refused_at_submit_naming_field_value_and_range(limited, submit, field,
                                                                                     shown, bound):
    before = snapshot(limited.store)
    err = refusal(lambda: submit(limited))
    assert err.code == "INVALID_ARGUMENT"
    assert err.message.startswith(f"{field} is {shown}") and bound in err.message, err.message
    assert snapshot(limited.store) == before
