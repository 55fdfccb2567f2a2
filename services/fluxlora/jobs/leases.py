"""A lease per job in the store: which replica of a service works on a job (issue 14). Pure logic
over the store (no threads, no gRPC); fluxlora.jobs.replicas drives it.

    jobs/leases/<service>/<job_id>/<epoch, 10 digits>.json   {"owner", "host", "pid", "epoch", "expires_at"}

- Taking a job is creating its next epoch with ArtifactStore.create_bytes (create-only on both stores):
  of two replicas that try, exactly one wins epoch N+1. A submit creates epoch 1; a replica takes a job
  over only once the newest epoch has expired, or its owner is known to be gone (below).
- Renewing is the owner rewriting its own epoch with a later `expires_at`, then listing the job's
  epochs: a newer one means another replica took the job over, and the owner lets it go (fencing).
- A lease that lapsed on its owner's own clock (renewals failed, e.g. the store was unreachable) is not
  renewed but taken again like any contender would, by creating the next epoch: winning proves no one
  else held the job meanwhile, losing means someone did.

Clocks. `expires_at` is wall-clock time (seconds since the epoch) of the owner; a contender compares it
with its own wall clock. The owner itself counts on its monotonic clock and treats its lease as valid
only for VALID_FRACTION of the lease after the write began, so the remaining quarter (7.5 s of the
default 30) absorbs clock skew between replicas plus the time a record write takes to land. Assumed:
replica clocks agree within a few seconds (NTP) and a store write lands within that margin.

Known gone: a lease taken under the default replica id (hostname-pid) whose process is not running
on this very host and pid namespace (a server restarted on one machine takes its jobs at once), or, at
start, a lease held under this replica's own id (an earlier process of the same pod). Replica ids must
be unique among the processes alive at one time.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import NotFound

LEASE_SECONDS = 30.0  # default of FLUXLORA_LEASE_SECONDS
VALID_FRACTION = 0.75  # of a lease, on the owner's monotonic clock, during which it writes the job's record
EPOCH_DIGITS = 10


@dataclass(frozen=True)
class Identity:
    """Who a replica is. `explicit`: the id was configured (FLUXLORA_REPLICA_ID), so the process
    check below does not apply to its leases."""

    replica: str
    host: str
    pid: int
    explicit: bool


def identity(configured: str = "") -> Identity:
    host = f"{socket.gethostname()}/{_pid_namespace()}"
    pid = os.getpid()
    return Identity(configured.strip() or f"{socket.gethostname()}-{pid}", host, pid, bool(configured.strip()))


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]": pids are comparable only within one
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


@dataclass(frozen=True)
class Lease:
    job_id: str
    epoch: int
    owner: str
    expires_at: float
    host: str = ""
    pid: int = 0
    explicit: bool = True

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        fields = json.loads(data)
        return cls(**{k: fields[k] for k in cls.__dataclass_fields__ if k in fields})


class LeaseBook:
    """Leases as objects in the store, read and written for one replica (`me`)."""

    def __init__(self, store: ArtifactStore, service: str, me: Identity, seconds: float = LEASE_SECONDS,
                 wall: Callable[[], float] = time.time):
        self.store = store
        self.prefix = f"jobs/leases/{service}/"
        self.me = me
        self.seconds = seconds
        self.wall = wall

    def key(self, job_id: str, epoch: int) -> str:
        return f"{self.prefix}{job_id}/{epoch:0{EPOCH_DIGITS}d}.json"

    def epochs(self, job_id: str) -> list[int]:
        found = []
        for info in self.store.list(f"{self.prefix}{job_id}/"):
            name = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            if name.isdigit():
                found.append(int(name))
        return sorted(found)

    def newest(self, job_id: str) -> Lease | None:
        """The job's newest lease, or None when it never had one."""
        epochs = self.epochs(job_id)
        if not epochs:
            return None
        try:
            return Lease.from_bytes(self.store.get_bytes(self.key(job_id, epochs[-1])))
        except NotFound:
            return None

    def mine(self, job_id: str, epoch: int) -> Lease:
        me = self.me
        return Lease(job_id, epoch, me.replica, self.wall() + self.seconds, me.host, me.pid, me.explicit)

    def create(self, job_id: str, epoch: int) -> Lease | None:
        """Epoch `epoch` for this replica if no one holds it yet; None when another replica does."""
        lease = self.mine(job_id, epoch)
        return lease if self.store.create_bytes(self.key(job_id, epoch), lease.to_bytes(), "application/json") else None

    def write(self, lease: Lease) -> None:
        self.store.put_bytes(self.key(lease.job_id, lease.epoch), lease.to_bytes(), "application/json")

    def expired(self, lease: Lease) -> bool:
        return self.wall() >= lease.expires_at

    def owner_gone(self, lease: Lease, at_start: bool = False) -> bool:
        """Whether the lease's owner is known not to run any more (see the module's docstring)."""
        if at_start and lease.owner == self.me.replica:
            return True
        return (not lease.explicit and lease.host == self.me.host and lease.pid != self.me.pid
                and not _running(lease.pid))

    def takeable(self, lease: Lease | None, at_start: bool = False) -> bool:
        return lease is None or self.expired(lease) or self.owner_gone(lease, at_start)


@dataclass
class _Held:
    lease: Lease
    valid_until: float  # monotonic


class JobLeases:
    """The leases this replica holds, with their validity on its own monotonic clock."""

    def __init__(self, book: LeaseBook, monotonic: Callable[[], float] = time.monotonic):
        self.book = book
        self.monotonic = monotonic
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def _hold(self, lease: Lease, began: float) -> None:
        with self._lock:
            self._held[lease.job_id] = _Held(lease, began + self.book.seconds * VALID_FRACTION)

    def take(self, job_id: str, newest: Lease | None) -> Lease | None:
        """Creates the epoch after `newest` (epoch 1 for a new job); the lease when this replica won it."""
        began = self.monotonic()
        lease = self.book.create(job_id, newest.epoch + 1 if newest else 1)
        if lease is not None:
            self._hold(lease, began)
        return lease

    def holds(self, job_id: str) -> bool:
        """Whether this replica may write the job's record now: it holds the lease and it has not lapsed."""
        with self._lock:
            held = self._held.get(job_id)
        return held is not None and self.monotonic() < held.valid_until

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def lease(self, job_id: str) -> Lease | None:
        with self._lock:
            held = self._held.get(job_id)
        return held.lease if held else None

    def renew(self, job_id: str) -> bool:
        """Pushes the lease on; False when another replica holds a newer epoch (the job is theirs now).
        A store error propagates: the lease stays held and lapses if renewals keep failing."""
        with self._lock:
            held = self._held.get(job_id)
        if held is None:
            return False
        began = self.monotonic()
        if began < held.valid_until:
            renewed = replace(held.lease, expires_at=self.book.wall() + self.book.seconds)
            self.book.write(renewed)
            if self.book.epochs(job_id)[-1:] != [renewed.epoch]:
                self.forget(job_id)
                return False
            self._hold(renewed, began)
            return True
        # Lapsed: another replica may have taken the job. Taking the next epoch proves it did not.
        if self.take(job_id, held.lease) is None:
            self.forget(job_id)
            return False
        return True

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def release(self, job_id: str) -> None:
        """Hands the job back: its lease expires now, so another replica may take it at once."""
        with self._lock:
            held = self._held.pop(job_id, None)
        if held is not None:
            self.book.write(replace(held.lease, expires_at=0.0))
