"""The failed-authentication lockout through a real server: an address that sends too many missing or
wrong tokens has every call refused with RESOURCE_EXHAUSTED (the right token too, so the answer never
tells a guesser which guess was right) until the cool-down ends; health checks and other addresses keep
working; the lockout is logged once, naming the address and never a token.

The server binds "localhost", which is both 127.0.0.1 and ::1: two client addresses on one machine."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import socket
import time

import grpc
import pytest

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.server.bootstrap import start_server
from fluxlora.server.healthcheck import serving
from fluxlora_client import FluxloraClient
from fluxlora_client.errors import FluxloraClientError

TOKEN = "tok-" + secrets.token_hex(16)
WRONG = "tok-" + secrets.token_hex(16)
LIST_JOBS = "/fluxlora.v1.JobService/ListJobs"
MAX_FAILURES = 3


def ipv6_loopback() -> bool:
    """Whether ::1 works (gRPC binds "localhost" as both loopbacks itself, whatever /etc/hosts says)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@contextlib.contextmanager
def locking_server(tmp_path, lockout_s: float):
    settings = Settings(store=str(tmp_path / "store"), cache_dir=tmp_path / "cache", host="localhost",
                        auth_token=TOKEN, auth_max_failures=MAX_FAILURES, auth_failure_window_s=60,
                        auth_lockout_s=lockout_s)
    server = start_server("preprocessing", settings, store=LocalStore(tmp_path / "store"), port=0)
    try:
        yield server
    finally:
        server.stop(grace=1.0)


def call(address: str, token: str | None = None, method: str = LIST_JOBS) -> tuple[grpc.StatusCode, str]:
    """ListJobs (an empty request is a valid one) from `address`'s side: the status code and details."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_an_address_that_keeps_failing_is_refused_even_with_the_right_token(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with locking_server(tmp_path, lockout_s=600) as server:
        v4 = f"127.0.0.1:{server.port}"
        assert call(v4)[0] == grpc.StatusCode.UNAUTHENTICATED  # missing token: failure 1
        assert call(v4, WRONG)[0] == grpc.StatusCode.UNAUTHENTICATED  # 2
        assert call(v4, TOKEN)[0] == grpc.StatusCode.OK  # a success does not wipe the count ...
        assert call(v4, WRONG)[0] == grpc.StatusCode.UNAUTHENTICATED  # ... so this third failure locks it out

        answers = {token: call(v4, token) for token in (TOKEN, WRONG, None)}
        unknown = call(v4, TOKEN, "/fluxlora.v1.NoSuchService/Nothing")
        for code, details in [*answers.values(), unknown]:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many failed authentications from this address" in details
            assert TOKEN not in details and WRONG not in details
        # the same answer whatever token came (up to the seconds left): nothing to learn from it
        assert len({re.sub(r"\d+", "N", details) for _, details in answers.values()}) == 1

        # the SDK sees it as it is (not UNAVAILABLE, which its channel would retry into the lockout)
        with FluxloraClient(preprocessing=v4, token=TOKEN) as client:
            with pytest.raises(FluxloraClientError) as err:
                client.list_jobs("preprocessing")
            assert err.value.code == "RESOURCE_EXHAUSTED"

        ok, answer = serving(v4, "fluxlora.v1.PreprocessingService")  # probes are exempt
        assert ok, answer

    lockouts = [r for r in caplog.records if "failed authentications from" in r.getMessage()]
    assert len(lockouts) == 1 and lockouts[0].levelno == logging.WARNING  # once per lockout, not per call
    assert "127.0.0.1" in lockouts[0].getMessage()
    assert TOKEN not in caplog.text and WRONG not in caplog.text


@pytest.mark.skipif(not ipv6_loopback(), reason="needs the IPv6 loopback as a second client address")
def test_other_addresses_keep_working_while_one_is_locked_out(tmp_path):
    with locking_server(tmp_path, lockout_s=600) as server:
        v4, v6 = f"127.0.0.1:{server.port}", f"[::1]:{server.port}"
        for _ in range(MAX_FAILURES):
            call(v4, WRONG)
        assert call(v4, TOKEN)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(v6, TOKEN) == (grpc.StatusCode.OK, "")
        assert call(v6, WRONG)[0] == grpc.StatusCode.UNAUTHENTICATED  # its own count, far from the limit
        with FluxloraClient(preprocessing=v6, token=TOKEN) as client:
            assert client.list_jobs("preprocessing") == []


def test_a_lockout_ends_after_its_cool_down_and_the_count_starts_afresh(tmp_path):
    with locking_server(tmp_path, lockout_s=2) as server:
        v4 = f"127.0.0.1:{server.port}"
        for _ in range(MAX_FAILURES):
            assert call(v4, WRONG)[0] == grpc.StatusCode.UNAUTHENTICATED
        seen = [call(v4, TOKEN)[0]]
        deadline = time.monotonic() + 60
        while seen[-1] != grpc.StatusCode.OK and time.monotonic() < deadline:
            time.sleep(0.2)
            seen.append(call(v4, TOKEN)[0])
        assert seen[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and seen[-1] == grpc.StatusCode.OK, seen
        assert set(seen) == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK}
        # afresh: the failures before the lockout are gone, so one more is just a failure
        assert call(v4, WRONG)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert call(v4, TOKEN)[0] == grpc.StatusCode.OK
