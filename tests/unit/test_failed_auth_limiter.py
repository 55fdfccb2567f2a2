"""The failed-authentication lockout's bookkeeping, on an injected clock: N failures within the window lock
an address out for the cool-down, then it starts afresh; other addresses are untouched; memory stays
bounded; the settings and their FLUXLORA_* names."""

from __future__ import annotations

import pytest

from fluxlora.common.auth import failed_auth_limiter
from fluxlora.common.auth_lockout import FailedAuthLimiter, peer_key
from fluxlora.common.config import Settings


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def limiter(clock, max_failures=3, window_s=60.0, lockout_s=30.0, max_peers=100) -> FailedAuthLimiter:
    return FailedAuthLimiter(max_failures, window_s, lockout_s, max_peers, clock=clock)


def test_the_nth_failure_within_the_window_locks_the_address_for_the_cool_down(clock):
    lock = limiter(clock)
    assert [lock.failed("10.0.0.7") for _ in range(3)] == [False, False, True]  # True once: the caller logs it
    assert lock.locked_for("10.0.0.7") == 30.0
    clock.now += 29.5
    assert lock.locked_for("10.0.0.7") == pytest.approx(0.5)
    clock.now += 0.5
    assert lock.locked_for("10.0.0.7") == 0.0


def test_after_a_lockout_the_address_starts_afresh(clock):
    lock = limiter(clock)
    for _ in range(3):
        lock.failed("10.0.0.7")
    clock.now += 30
    assert lock.locked_for("10.0.0.7") == 0.0
    assert [lock.failed("10.0.0.7") for _ in range(3)] == [False, False, True]


def test_failures_older_than_the_window_do_not_count(clock):
    lock = limiter(clock, window_s=10)
    lock.failed("10.0.0.7")
    lock.failed("10.0.0.7")
    clock.now += 10  # the first two slide out of the window
    assert not lock.failed("10.0.0.7") and not lock.failed("10.0.0.7")
    assert lock.locked_for("10.0.0.7") == 0.0
    assert lock.failed("10.0.0.7")  # three within 10 s


def test_other_addresses_are_not_locked_out(clock):
    lock = limiter(clock)
    for _ in range(3):
        lock.failed("10.0.0.7")
    assert lock.locked_for("10.0.0.7") > 0
    assert lock.locked_for("10.0.0.8") == 0.0
    assert not lock.failed("10.0.0.8")


def test_memory_is_bounded_and_the_least_recently_seen_address_is_forgotten(clock):
    lock = limiter(clock, max_failures=2, max_peers=3)
    lock.failed("a")
    lock.failed("a")  # locked out
    for name in ("b", "c"):
        lock.failed(name)
    assert lock.locked_for("a") > 0  # still knocking: now the most recently seen
    lock.failed("d")  # one address too many: "b" is forgotten, not the locked-out "a"
    assert lock.tracked() == 3
    assert lock.locked_for("a") > 0
    assert not lock.failed("b")  # remembered, this second failure would have locked it out
    for i in range(1000):
        lock.failed(f"spray-{i}")
    assert lock.tracked() == 3


def test_peer_addresses_are_keyed_without_the_port_and_ipv6_by_its_64():
    assert peer_key("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_key("ipv6:%5B::1%5D:39054") == "::1"  # how grpc spells it
    assert peer_key("ipv6:[2001:db8:1:2:aaaa::1]:443") == "2001:db8:1:2::/64"
    assert peer_key("ipv6:[2001:db8:1:2:bbbb::9]:444") == peer_key("ipv6:[2001:db8:1:2:aaaa::1]:443")
    assert peer_key("ipv6:[::ffff:10.0.0.7]:80") == "10.0.0.7"
    assert peer_key("unix:/run/fluxlora.sock") == "unix:/run/fluxlora.sock"


def test_the_settings_and_their_names(monkeypatch):
    defaults = Settings()
    assert (defaults.auth_max_failures, defaults.auth_failure_window_s, defaults.auth_lockout_s) == (20, 60.0, 60.0)
    assert defaults.auth_tracked_peers == 10_000
    monkeypatch.setenv("FLUXLORA_AUTH_MAX_FAILURES", "5")
    monkeypatch.setenv("FLUXLORA_AUTH_FAILURE_WINDOW_S", "10")
    monkeypatch.setenv("FLUXLORA_AUTH_LOCKOUT_S", "300")
    monkeypatch.setenv("FLUXLORA_AUTH_TRACKED_PEERS", "50")
    made = failed_auth_limiter(Settings())
    assert (made.max_failures, made.window_s, made.lockout_s, made.max_peers) == (5, 10.0, 300.0, 50)
    monkeypatch.setenv("FLUXLORA_AUTH_MAX_FAILURES", "0")
    assert failed_auth_limiter(Settings()) is None  # 0: off


def test_nonsense_limits_are_refused(clock):
    for args in ((0, 60, 60), (3, 0, 60), (3, 60, 0)):
        with pytest.raises(ValueError):
            FailedAuthLimiter(*args, clock=clock)
