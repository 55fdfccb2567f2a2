"""A disk that fills up while preprocessing stores a dataset: the job fails RESOURCE_EXHAUSTED naming
the disk and the fix, what it had stored of the dataset is taken back (no stray copies of the
originals keep filling the disk), the upload stays for a retry, and a complete dataset made earlier
from the same photos is never touched."""

from __future__ import annotations

import errno

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient
from support import preprocessing_server, put_photos


class FillingStore(LocalStore):
    """A local store whose disk is full for processed images once `full` is set."""

    full = False

    def put_file(self, key, path, content_type="application/octet-stream"):
        if self.full and key.startswith("datasets/") and "/images/" in key:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))
        return super().put_file(key, path, content_type)


@pytest.fixture
def filling(tmp_path):
    return FillingStore(tmp_path / "store")


def _keys(store, prefix):
    return sorted(info.key for info in store.list(prefix))


def test_a_full_disk_fails_the_job_clearly_and_leaves_no_partial_dataset(tmp_path, photos, filling):
    source = put_photos(filling, photos, "album")
    filling.full = True
    with preprocessing_server(tmp_path, store=filling) as server, \
            FluxloraClient(preprocessing=server.address) as client:
        job = client.wait(client.preprocess(source, base_size=64), raise_on_failure=False)
    assert job.state == jobs_pb2.JOB_STATE_FAILED
    assert job.error.code == "RESOURCE_EXHAUSTED"
    assert "no space left" in job.error.message and "free space" in job.error.message
    assert _keys(filling, "datasets/") == []  # the originals it copied are gone again
    assert len(_keys(filling, source)) == len([p for p in photos.iterdir() if p.is_file()])  # the upload stays


def test_a_complete_dataset_from_the_same_photos_survives_a_later_full_disk(tmp_path, photos, filling):
    source = put_photos(filling, photos, "album")
    with preprocessing_server(tmp_path, store=filling) as server, \
            FluxloraClient(preprocessing=server.address) as client:
        first = client.wait(client.preprocess(source, base_size=64))
        complete = _keys(filling, "datasets/")
        filling.full = True
        again = client.wait(client.preprocess(source, base_size=64), raise_on_failure=False)
    assert again.error.code == "RESOURCE_EXHAUSTED"
    assert _keys(filling, "datasets/") == complete
    assert client.result(first).dataset_id in complete[0]
