"""Retrying the object store: which failures are worth waiting for, how long between attempts
(exponential backoff, full jitter), and the UNAVAILABLE that ends a wait that did not pay off."""

from __future__ import annotations

import http.server
import logging
import threading

import pytest
from minio.error import S3Error, ServerError
from urllib3 import exceptions as u3

from fluxlora.common.config import Settings
from fluxlora.common.s3_retry import RetryPolicy, transient_reason, with_retries
from fluxlora.common.storage import S3Store
from fluxlora_api.shared.errors import NotFound, Unavailable, status_of

TINY = RetryPolicy(retries=3, base_s=0.001, max_s=0.002)


def refused() -> u3.MaxRetryError:
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError as cause:
        try:
            raise u3.NewConnectionError(None, "Failed to establish a new connection") from cause
        except u3.NewConnectionError as exc:
            return u3.MaxRetryError(None, "/bucket/key", exc)


def s3_error(code: str, status: int) -> S3Error:
    class Response:
        pass

    response = Response()
    response.status = status
    return S3Error(response, code, "message", "/bucket/key", "req", "host")


@pytest.mark.parametrize("exc, reason", [
    (refused(), "cannot connect (ConnectionRefusedError: Connection refused)"),
    (u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer")),
     "connection lost (ConnectionResetError: Connection reset by peer)"),
    (u3.ReadTimeoutError(None, "/k", "Read timed out."), "timed out"),
    (ConnectionResetError(104, "Connection reset by peer"), "connection lost (ConnectionResetError: "
                                                            "Connection reset by peer)"),
    (ServerError("server failed", 503), "HTTP 503"),
    (ServerError("server failed", 502), "HTTP 502"),
    (s3_error("SlowDown", 503), "SlowDown (HTTP 503)"),
    (s3_error("InternalError", 500), "InternalError (HTTP 500)"),
])
def test_transient_failures_are_retried(exc, reason):
    assert transient_reason(exc) == reason


@pytest.mark.parametrize("exc", [
    s3_error("NoSuchKey", 404), s3_error("AccessDenied", 403), ServerError("server failed", 501),
    u3.SSLError("certificate verify failed"), u3.MaxRetryError(None, "/k", u3.SSLError("bad cert")),
    ValueError("bad"), NotFound("no such object"),
])
def test_other_failures_are_not(exc):
    assert transient_reason(exc) is None


def test_backoff_doubles_up_to_the_cap_and_jitters_below_it():
    policy = RetryPolicy(retries=6, base_s=0.5, max_s=3.0)
    assert [policy.cap(n) for n in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert policy.delay(2, rng=lambda: 1.0) == 2.0 and policy.delay(2, rng=lambda: 0.25) == 0.5
    assert policy.longest_wait_s == 12.5


def test_the_defaults_wait_about_half_a_minute_and_settings_override_them(monkeypatch):
    default = RetryPolicy.from_settings(Settings())
    assert default == RetryPolicy()
    assert 40 < default.longest_wait_s < 70  # average (full jitter): half of it
    monkeypatch.setenv("FLUXLORA_S3_RETRIES", "2")
    monkeypatch.setenv("FLUXLORA_S3_RETRY_BASE_S", "0.01")
    monkeypatch.setenv("FLUXLORA_S3_RETRY_MAX_S", "0.05")
    assert RetryPolicy.from_settings(Settings()) == RetryPolicy(retries=2, base_s=0.01, max_s=0.05)


def test_a_call_that_recovers_returns_after_one_logged_retry_per_failure(caplog):
    failures = [refused(), ServerError("server failed", 503)]
    slept: list[float] = []

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "stored"

    caplog.set_level(logging.WARNING)
    policy = RetryPolicy(retries=5, base_s=0.5, max_s=8.0)
    assert with_retries(call, "writing 'k'", "s3://b at minio:9000", policy, sleep=slept.append,
                        rng=lambda: 0.5) == "stored"
    assert slept == [0.25, 0.5]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == [
        "object store s3://b at minio:9000: cannot connect (ConnectionRefusedError: Connection refused) "
        "while writing 'k'; retry 1 of 5 in 0.25s",
        "object store s3://b at minio:9000: HTTP 503 while writing 'k'; retry 2 of 5 in 0.50s",
    ]


def test_a_call_that_never_recovers_is_unavailable_with_what_to_do():
    attempts = []

    def call():
        attempts.append(1)
        raise refused()

    with pytest.raises(Unavailable) as failure:
        with_retries(call, "writing 'runs/r/x'", "s3://b at minio:9000", TINY)
    assert len(attempts) == TINY.retries + 1
    code, message = status_of(failure.value)
    assert code == "UNAVAILABLE"
    assert message.startswith("object store s3://b at minio:9000 unreachable while writing 'runs/r/x': "
                              "cannot connect (ConnectionRefusedError: Connection refused); gave up after 4 attempts")
    assert "retry the request or resubmit the job" in message and "FLUXLORA_S3_RETRIES" in message


def test_a_permanent_failure_is_raised_at_once():
    attempts = []

    def call():
        attempts.append(1)
        raise s3_error("AccessDenied", 403)

    with pytest.raises(S3Error):
        with_retries(call, "reading 'k'", "s3://b", TINY, sleep=lambda s: pytest.fail("slept"))
    assert len(attempts) == 1


class SlowDownS3(http.server.BaseHTTPRequestHandler):
    """Says the bucket exists, then answers every other request 503 (PUT: S3's SlowDown error)."""

    requests: list[str] = []

    def do_HEAD(self):
        self.requests.append(f"HEAD {self.path}")
        self.send_response(200 if self.path.count("/") == 1 else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self):
        self.requests.append(f"PUT {self.path}")
        self.rfile.read(int(self.headers["Content-Length"]))
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_down_endpoint():
    SlowDownS3.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowDownS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_real_client_retries_slow_down_and_5xx_once_per_policy_attempt(slow_down_endpoint, caplog):
    caplog.set_level(logging.WARNING)
    store = S3Store.connect(slow_down_endpoint, "bucket", "test", "a-secret-key", retry=TINY)
    with pytest.raises(Unavailable, match=r"unreachable while writing 'runs/r/x.bin': SlowDown \(HTTP 503\)"):
        store.put_bytes("runs/r/x.bin", b"data")
    # our policy's attempts and no more: urllib3 underneath retries nothing by itself
    assert [r for r in SlowDownS3.requests if r.startswith("PUT")] == ["PUT /bucket/runs/r/x.bin"] * 4
    with pytest.raises(Unavailable, match=r"while reading 'runs/r/x.bin': HTTP 503"):
        store.stat("runs/r/x.bin")
    assert SlowDownS3.requests.count("HEAD /bucket/runs/r/x.bin") == 4
    assert not any("a-secret-key" in r.getMessage() for r in caplog.records)
