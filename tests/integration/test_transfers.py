"""Clients move files only through the servers (fluxlora.v1.TransferService): presigned, expiring URLs
for an S3 store, bytes streamed over gRPC for the local store; the client holds no store credentials.

S3 here is moto behind tests/s3_gateway.py, a front that checks presigned URLs as S3 and MinIO do
(moto itself checks none: the first test shows it) and that records what reached the store.
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from s3_gateway import SigV4Gateway, check_presigned

from fluxlora.common.storage import LocalStore
from fluxlora_api.v1 import jobs_pb2, transfers_pb2_grpc
from fluxlora_api.v1 import transfers_pb2 as pb
from fluxlora_client import FluxloraClient, FluxloraClientError
from support import make_s3_store, preprocessing_server

S = jobs_pb2.JobState
EXPIRY_S = 120


@pytest.fixture
def gateway(moto_endpoint):
    with SigV4Gateway(moto_endpoint, {"test": "test"}) as gw:
        yield gw


@pytest.fixture(params=["local", "s3"])
def served(request, tmp_path):
    """A preprocessing server over a local store, or over S3 whose URLs clients reach via the gateway;
    (server, gateway or None)."""
    gw = None
    if request.param == "local":
        store = LocalStore(tmp_path / "store")
    else:
        gw = request.getfixturevalue("gateway")
        store = make_s3_store(request.getfixturevalue("moto_endpoint"), public_endpoint=gw.address)
    with preprocessing_server(tmp_path, store=store, presign_expiry_s=EXPIRY_S) as server:
        yield server, gw


def client_env() -> dict[str, str]:
    """What the client's environment holds: the token and TLS variables at most; no store, no S3 keys."""
    return {}


def put(url: str, data: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=data, method="PUT",
                                     headers={**headers, "Content-Length": str(len(data))})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def declare(files: dict[str, bytes]) -> list[pb.UploadFileSpec]:
    return [pb.UploadFileSpec(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for p, d in files.items()]


def stub(server) -> transfers_pb2_grpc.TransferServiceStub:
    return transfers_pb2_grpc.TransferServiceStub(grpc.insecure_channel(server.address))


def code_of(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value.code()


def test_moto_itself_accepts_presigned_urls_s3_would_refuse(moto_endpoint):
    """Why the gateway: moto stores a PUT with an altered signature, for another key, or long expired."""
    store = make_s3_store(moto_endpoint)
    url = store.presign("PUT", "uploads/u-a/x.jpg", 60)
    headers = {"Content-Type": "application/octet-stream"}
    assert put(url[:-4] + "0000", b"tampered", headers) == 200
    assert put(url.replace("/u-a/", "/u-b/"), b"moved", headers) == 200
    assert store.get_bytes("uploads/u-a/x.jpg") == b"tampered" and store.get_bytes("uploads/u-b/x.jpg") == b"moved"


def test_the_gateway_checks_minio_signatures_with_botocore(moto_endpoint):
    store = make_s3_store(moto_endpoint, public_endpoint="files.example:9000")
    url = store.presign("PUT", "uploads/u-a/a b+c.jpg", 60)
    path = url.split("files.example:9000", 1)[1]
    now = datetime.datetime.now(datetime.UTC)
    secrets = {"test": "test"}
    assert check_presigned("PUT", path, "files.example:9000", secrets, now) == ""
    assert check_presigned("GET", path, "files.example:9000", secrets, now) == "SignatureDoesNotMatch"
    assert check_presigned("PUT", path, "other.example:9000", secrets, now) == "SignatureDoesNotMatch"
    assert check_presigned("PUT", path.replace("/u-a/", "/u-b/"), "files.example:9000", secrets, now) == \
        "SignatureDoesNotMatch"
    assert check_presigned("PUT", path.replace("X-Amz-Expires=60", "X-Amz-Expires=600"), "files.example:9000",
                           secrets, now) == "SignatureDoesNotMatch"
    assert check_presigned("PUT", path, "files.example:9000", {"test": "other"}, now) == "SignatureDoesNotMatch"
    later = now + datetime.timedelta(seconds=61)
    assert check_presigned("PUT", path, "files.example:9000", secrets, later).endswith("Request has expired")


def test_presigned_urls_expired_moved_or_tampered_are_refused_by_the_store(moto_endpoint, gateway, tmp_path):
    store = make_s3_store(moto_endpoint, public_endpoint=gateway.address)
    files = {"a.jpg": b"photo a", "b.jpg": b"photo b"}
    other = {"c.jpg": b"photo c"}
    with preprocessing_server(tmp_path, store=store, presign_expiry_s=EXPIRY_S) as server:
        transfers = stub(server)
        upload = transfers.CreateUpload(pb.CreateUploadRequest(files=declare(files)), timeout=30)
        second = transfers.CreateUpload(pb.CreateUploadRequest(files=declare(other)), timeout=30)
        assert upload.mode == pb.TRANSFER_MODE_PRESIGNED and upload.upload_prefix != second.upload_prefix
        a, b = upload.targets
        assert a.key == upload.upload_prefix + "a.jpg" and gateway.address in a.url
        assert a.headers == {"Content-Type": "application/octet-stream"}
        left = a.expires_at.ToDatetime(datetime.UTC) - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(seconds=EXPIRY_S - 30) < left <= datetime.timedelta(seconds=EXPIRY_S)

        tampered = a.url[:-1] + ("0" if a.url[-1] != "0" else "1")
        assert put(tampered, files["a.jpg"], dict(a.headers)) == 403
        # a URL reused for another upload's prefix (or another file): the signature covers the key
        moved = a.url.replace(upload.upload_prefix, second.upload_prefix).replace("a.jpg", "c.jpg")
        assert put(moved, other["c.jpg"], dict(a.headers)) == 403
        assert put(a.url.replace("a.jpg", "b.jpg"), files["b.jpg"], dict(a.headers)) == 403
        gateway.offset = datetime.timedelta(seconds=EXPIRY_S + 1)
        assert put(a.url, files["a.jpg"], dict(a.headers)) == 403
        assert [r[2] for r in gateway.refused][-1].endswith("Request has expired")
        assert gateway.forwarded == [] and list(store.list("uploads/")) == []

        gateway.offset = datetime.timedelta()
        assert put(a.url, files["a.jpg"], dict(a.headers)) == 200
        assert put(b.url, b"photo B", dict(b.headers)) == 200  # a valid URL, other bytes of the same size
        assert code_of(lambda: transfers.CompleteUpload(
            pb.CompleteUploadRequest(upload_prefix=upload.upload_prefix), timeout=30)) == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert [o.key for o in store.list(upload.upload_prefix)] == [a.key]  # the wrong one was deleted
        assert FluxloraClient(preprocessing=server.address).upload_photos(_folder(tmp_path, files)) == \
            upload.upload_prefix  # the SDK sends what is missing and completes the upload
        assert store.get_bytes(b.key) == files["b.jpg"]


def _folder(tmp_path, files: dict[str, bytes]):
    folder = tmp_path / "photos"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_the_sdk_uploads_preprocesses_and_downloads_with_no_store_credentials(served, photos, tmp_path):
    server, gateway = served
    with FluxloraClient.from_env(client_env(), preprocessing=server.address) as client:
        assert not hasattr(client, "store")
        prefix = client.upload_photos(photos)
        files = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*") if p.is_file())
        assert sorted(o.key for o in server.store.list("uploads/")) == [prefix + f for f in files]
        for f in files:
            assert server.store.get_bytes(prefix + f) == (photos / f).read_bytes()
        if gateway:  # each file went to the store exactly once, through its presigned URL
            assert sorted(gateway.forwarded) == sorted(("PUT", f"/{server.store.bucket}/{prefix}{f}") for f in files)
            gateway.forwarded.clear()
        assert client.upload_photos(photos) == prefix  # the same photos: nothing sent again
        assert gateway is None or gateway.forwarded == []

        job = client.wait(client.preprocess(prefix, base_size=256))
        assert job.state == S.JOB_STATE_SUCCEEDED
        dataset = client.result(job).dataset_id
        images = client.download(f"datasets/{dataset}/images/", tmp_path / "out" / "images")
        assert images and all(p.read_bytes() == server.store.get_bytes(f"datasets/{dataset}/images/{p.name}")
                              for p in images)
        [manifest] = client.download(f"datasets/{dataset}/manifest.json", tmp_path / "out")
        assert manifest.read_bytes() == server.store.get_bytes(f"datasets/{dataset}/manifest.json")
        if gateway:  # downloads came through presigned GETs
            assert {m for m, _ in gateway.forwarded} == {"GET"} and len(gateway.forwarded) == len(images) + 1


def test_the_sdk_streams_through_the_server_when_the_store_is_out_of_reach(moto_endpoint, photos, tmp_path):
    store = make_s3_store(moto_endpoint, public_endpoint="127.0.0.1:1")  # nothing listens there
    with preprocessing_server(tmp_path, store=store) as server, \
            FluxloraClient.from_env(client_env(), preprocessing=server.address) as client:
        prefix = client.upload_photos(photos)
        assert len(list(store.list(prefix))) == len(list(p for p in photos.rglob("*") if p.is_file()))
        [one] = client.download(next(store.list(prefix)).key, tmp_path / "out")
        assert one.read_bytes() == store.get_bytes(next(store.list(prefix)).key)


def test_streamed_uploads_store_only_the_declared_bytes(tmp_path):
    files = {"a.jpg": b"photo a", "b.jpg": b"photo b"}
    with preprocessing_server(tmp_path) as server:
        transfers = stub(server)
        upload = transfers.CreateUpload(pb.CreateUploadRequest(files=declare(files)), timeout=30)
        assert upload.mode == pb.TRANSFER_MODE_STREAM and all(t.url == "" for t in upload.targets)
        prefix = upload.upload_prefix

        def send(path, data, upload_prefix=prefix):
            chunks = [pb.UploadChunk(upload_prefix=upload_prefix, path=path), pb.UploadChunk(data=data)]
            return transfers.UploadFile(iter(chunks), timeout=30)

        assert code_of(lambda: send("a.jpg", b"photo A")) == grpc.StatusCode.INVALID_ARGUMENT  # tampered
        assert code_of(lambda: send("c.jpg", b"photo a")) == grpc.StatusCode.INVALID_ARGUMENT  # undeclared
        assert code_of(lambda: send("../a.jpg", b"photo a")) == grpc.StatusCode.INVALID_ARGUMENT
        other = "uploads/u-" + "0" * 32 + "/"
        assert code_of(lambda: send("a.jpg", b"photo a", other)) == grpc.StatusCode.FAILED_PRECONDITION
        assert code_of(lambda: send("a.jpg", b"photo a", "datasets/x/")) == grpc.StatusCode.INVALID_ARGUMENT
        assert list(server.store.list("uploads/")) == []

        submit = FluxloraClient(preprocessing=server.address)
        send("a.jpg", files["a.jpg"])
        with pytest.raises(FluxloraClientError) as refused:  # declared, not complete: preprocessing waits
            submit.preprocess(prefix, base_size=64)
        assert refused.value.code == "FAILED_PRECONDITION" and "not complete" in refused.value.message
        send("b.jpg", files["b.jpg"])
        done = transfers.CompleteUpload(pb.CompleteUploadRequest(upload_prefix=prefix), timeout=30)
        assert (done.file_count, done.total_bytes) == (2, 14)
        assert sorted(o.key for o in server.store.list(prefix)) == [prefix + "a.jpg", prefix + "b.jpg"]


def test_what_a_client_may_name_and_read(tmp_path):
    with preprocessing_server(tmp_path, max_upload_bytes=100) as server:
        server.store.put_bytes("jobs/preprocessing/pre-1.json", b"{}")
        server.store.put_bytes("datasets/d/manifest.json", b"{}")
        transfers = stub(server)
        for path in ("../x.jpg", "/etc/passwd", "a/../../x.jpg"):
            files = [pb.UploadFileSpec(path=path, size=1, sha256="0" * 64)]
            assert code_of(transfers.CreateUpload, pb.CreateUploadRequest(files=files)) == \
                grpc.StatusCode.INVALID_ARGUMENT
        big = [pb.UploadFileSpec(path="a.jpg", size=101, sha256="0" * 64)]
        assert code_of(lambda: transfers.CreateUpload(pb.CreateUploadRequest(files=big), timeout=30)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        for prefix, code in [("jobs/", grpc.StatusCode.PERMISSION_DENIED),
                             ("models/", grpc.StatusCode.PERMISSION_DENIED),
                             ("transfers/", grpc.StatusCode.PERMISSION_DENIED),
                             ("datasets/../jobs/", grpc.StatusCode.INVALID_ARGUMENT),
                             ("/datasets/", grpc.StatusCode.INVALID_ARGUMENT)]:
            assert code_of(transfers.ListArtifacts, pb.ListArtifactsRequest(prefix=prefix)) == code
        assert code_of(lambda: list(transfers.DownloadFile(
            pb.DownloadFileRequest(key="jobs/preprocessing/pre-1.json"), timeout=30))) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: list(transfers.DownloadFile(
            pb.DownloadFileRequest(key="datasets/d/missing.json"), timeout=30))) == grpc.StatusCode.NOT_FOUND
        listed = transfers.ListArtifacts(pb.ListArtifactsRequest(prefix="datasets/", include_urls=True), timeout=30)
        assert [(a.key, a.size, a.url) for a in listed.artifacts] == [("datasets/d/manifest.json", 2, "")]


def test_the_client_package_imports_nothing_from_the_servers():
    """What the clean client-only environment would import (the server distribution's CLI plugins, found
    through the fluxlora.cli entry points, are absent there, so none are loaded here)."""
    code = ("import importlib.metadata, sys\n"
            "importlib.metadata.entry_points = lambda **kw: []\n"
            "import fluxlora_client, fluxlora_client.client, fluxlora_client.captions, fluxlora_client.pipeline\n"
            "import fluxlora_client.caption_cli, fluxlora_client.transfers\n"
            "from fluxlora_client import cli\n"
            "cli._client().close()\n"
            "fluxlora_client.FluxloraClient.from_env({}).close()\n"
            "bad = sorted(m for m in sys.modules if m == 'fluxlora' or m.startswith('fluxlora.'))\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
