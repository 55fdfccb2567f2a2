"""The lease protocol (fluxlora.jobs.leases) on both stores, on injected clocks: of replicas racing for
a job's next epoch exactly one wins; a lease is taken over only once it expired (or its owner is known
gone); an owner that renews keeps it; an owner whose job was taken over learns it at its next renewal
and lets go (fencing), and one whose lease lapsed takes it back only if no one else took it."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fluxlora.jobs import leases
from fluxlora.jobs.leases import Identity, JobLeases, LeaseBook

L = 30.0


class Clocks:
    """One wall clock all replicas read (skew is covered by VALID_FRACTION) and a monotonic one each."""

    def __init__(self):
        self.wall = 1_000_000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds


def replica(store, clocks: Clocks, name: str) -> JobLeases:
    book = LeaseBook(store, "preprocessing", Identity(name, "host/ns", 1, explicit=True), L, wall=lambda: clocks.wall)
    return JobLeases(book, monotonic=lambda: clocks.wall)  # the same clock: no skew in these tests


def race(contenders, attempt):
    barrier = threading.Barrier(len(contenders))

    def go(contender):
        barrier.wait()
        return attempt(contender)

    with ThreadPoolExecutor(len(contenders)) as pool:
        return list(pool.map(go, contenders))


def test_of_replicas_racing_for_a_job_exactly_one_wins_each_epoch(store):
    clocks = Clocks()
    replicas = [replica(store, clocks, f"r{i}") for i in range(6)]
    won = race(replicas, lambda r: r.take("pre-1", None))
    assert sum(lease is not None for lease in won) == 1
    [owner] = [r for r, lease in zip(replicas, won, strict=True) if lease is not None]
    newest = owner.book.newest("pre-1")
    assert newest.epoch == 1 and newest.owner == owner.book.me.replica
    others = [r for r in replicas if r is not owner]
    assert not any(r.book.takeable(r.book.newest("pre-1")) for r in others)  # held, not expired

    clocks.advance(L + 0.1)  # the owner stopped renewing: anyone may take epoch 2, and one does
    assert all(r.book.takeable(newest) for r in others)
    won = race(others, lambda r: r.take("pre-1", newest))
    assert sum(lease is not None for lease in won) == 1
    assert owner.book.epochs("pre-1") == [1, 2]


def test_a_renewed_lease_is_not_taken_over_and_an_unrenewed_one_is(store):
    clocks = Clocks()
    a, b = replica(store, clocks, "a"), replica(store, clocks, "b")
    assert a.take("pre-1", None) and a.holds("pre-1")
    for _ in range(4):  # renewed every third of the lease, for more than a lease in all
        clocks.advance(L / 3)
        assert a.renew("pre-1")
        assert not b.book.takeable(b.book.newest("pre-1"))
    clocks.advance(L * leases.VALID_FRACTION)  # a stops renewing: it stops writing before b may take over
    assert not a.holds("pre-1")
    assert not b.book.takeable(b.book.newest("pre-1"))
    clocks.advance(L * (1 - leases.VALID_FRACTION))
    newest = b.book.newest("pre-1")
    assert b.book.takeable(newest) and b.take("pre-1", newest).epoch == 2


def test_an_owner_whose_job_was_taken_over_lets_go_at_its_next_renewal(store):
    clocks = Clocks()
    a, b = replica(store, clocks, "a"), replica(store, clocks, "b")
    a.take("pre-1", None)
    a.monotonic = lambda: 0.0  # a was paused (or cut off from the store): its own clock says it is valid
    clocks.advance(L + 1)
    assert b.take("pre-1", b.book.newest("pre-1")) is not None
    assert a.holds("pre-1")  # it cannot know yet: the window the module docstring describes
    assert a.renew("pre-1") is False and not a.holds("pre-1")
    assert b.book.newest("pre-1").owner == "b" and b.renew("pre-1")  # a's late renewal of epoch 1 changed nothing


def test_a_lapsed_owner_takes_its_job_back_only_if_no_one_else_did(store):
    clocks = Clocks()
    a, b = replica(store, clocks, "a"), replica(store, clocks, "b")
    a.take("pre-1", None)
    a.take("pre-2", None)
    clocks.advance(L + 1)  # renewals failed for a whole lease (the store was down)
    assert not a.holds("pre-1") and not a.holds("pre-2")
    assert b.take("pre-2", b.book.newest("pre-2")) is not None  # b took one of them meanwhile
    assert a.renew("pre-1") and a.holds("pre-1") and a.book.newest("pre-1").epoch == 2
    assert a.renew("pre-2") is False and not a.holds("pre-2")


def test_a_store_error_while_renewing_keeps_the_lease_until_it_lapses(store, monkeypatch):
    clocks = Clocks()
    a = replica(store, clocks, "a")
    a.take("pre-1", None)

    def down(lease):
        raise OSError("store unreachable")

    monkeypatch.setattr(a.book, "write", down)
    clocks.advance(L / 3)
    with pytest.raises(OSError):
        a.renew("pre-1")
    assert a.holds("pre-1")
    clocks.advance(L / 2)
    assert not a.holds("pre-1")


def test_a_released_lease_is_free_at_once(store):
    clocks = Clocks()
    a, b = replica(store, clocks, "a"), replica(store, clocks, "b")
    a.take("pre-1", None)
    a.release("pre-1")
    assert not a.holds("pre-1") and b.book.takeable(b.book.newest("pre-1"))


def test_a_dead_process_on_this_host_or_an_earlier_life_at_start_holds_nothing(tmp_path):
    from fluxlora.common.storage import LocalStore

    store = LocalStore(tmp_path / "store")
    me = leases.identity()
    book = LeaseBook(store, "preprocessing", me, L)
    assert not me.explicit and me.replica.endswith(f"-{me.pid}")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = leases.Lease("pre-1", 1, "h-1", book.wall() + L, me.host, child.pid, explicit=False)
        assert not book.takeable(alive)  # a live process of this host holds it
    finally:
        child.kill()
        child.wait()
    assert book.takeable(alive)  # that process is gone: no need to wait for the lease to expire
    elsewhere = leases.Lease("pre-1", 1, "h-1", book.wall() + L, "another/host", child.pid, explicit=False)
    named = leases.Lease("pre-1", 1, "pod-a", book.wall() + L, me.host, child.pid, explicit=True)
    assert not book.takeable(elsewhere) and not book.takeable(named)  # only expiry frees these
    mine = leases.Lease("pre-1", 1, me.replica, book.wall() + L, me.host, me.pid, me.explicit)
    assert not book.takeable(mine) and book.takeable(mine, at_start=True)
