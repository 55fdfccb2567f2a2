"""The fault schedule: every fault drawn up front from random.Random(seed), so a seed replays it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SERVICES = ("preprocessing", "captioning", "training", "evaluation")

# kind -> (weight, stores it applies to)
KINDS: dict[str, tuple[int, tuple[str, ...]]] = {
    "sigkill_server": (4, ("local", "s3")),   # SIGKILL of one server process (its children left alone)
    "sigterm_server": (2, ("local", "s3")),   # SIGTERM, then the same command again (or a rolling restart)
    "sigkill_worker": (3, ("local", "s3")),   # SIGKILL of a training worker child (found via /proc)
    "store_outage": (3, ("s3",)),             # the S3 proxy resets every connection for a while
    "slow_store": (2, ("s3",)),               # the S3 proxy delays every request chunk
    "lost_bucket": (1, ("s3",)),              # the S3 proxy answers 404 NoSuchBucket for a while
    "disk_full": (2, ("local",)),             # the local store's small file system filled to the brim
    "hostile": (3, ("local", "s3")),          # a burst of hostile requests
}


@dataclass
class Fault:
    at: float                 # seconds after the load started
    kind: str
    target: str = ""          # the service, for process faults
    duration: float = 0.0     # how long an outage/slowness/full disk lasts; a killed server stays down
    param: float = 0.0        # slow_store: added latency (s); sigterm_server: 1 = restart while the old one stops
    outcome: str = field(default="", compare=False)  # filled in by the injector: what happened

    def describe(self) -> str:
        extra = f" {self.target}" if self.target else ""
        if self.duration:
            extra += f" for {self.duration:.1f}s"
        if self.kind == "slow_store":
            extra += f" (+{self.param:.2f}s per chunk)"
        if self.kind == "sigterm_server" and self.param:
            extra += " (rolling: the new generation first, then SIGTERM to the old)"
        return f"t={self.at:7.1f}s {self.kind}{extra}"


def make_schedule(seed: int, seconds: float, store: str, mean_gap_s: float = 20.0,
                  kinds: tuple[str, ...] | None = None) -> list[Fault]:
    """Faults over `seconds` for one store, about one every `mean_gap_s` (exponential gaps), kinds
    weighted by KINDS and limited to those that apply to `store` (and to `kinds` if given)."""
    rng = random.Random(f"{seed}-{store}")
    choices = [(k, w) for k, (w, stores) in KINDS.items() if store in stores and (kinds is None or k in kinds)]
    names, weights = [k for k, _ in choices], [w for _, w in choices]
    faults, t = [], rng.uniform(3.0, 8.0)
    first = rng.sample(names, len(names))  # every kind once first (a short run covers them all), then weighted
    while t < seconds:
        kind = first.pop() if first else rng.choices(names, weights)[0]
        fault = Fault(at=round(t, 1), kind=kind)
        if kind in ("sigkill_server", "sigterm_server"):
            fault.target = rng.choice(SERVICES)
            fault.duration = round(rng.choice([0.0, rng.uniform(0.5, 8.0)]), 1)
            fault.param = float(kind == "sigterm_server" and rng.random() < 0.5)
        elif kind == "sigkill_worker":
            fault.target = "training"
        elif kind == "store_outage":
            # mostly shorter than the store retries (~28 s on average), sometimes longer
            fault.duration = round(rng.uniform(1.0, 15.0) if rng.random() < 0.8 else rng.uniform(40.0, 70.0), 1)
        elif kind == "slow_store":
            fault.duration = round(rng.uniform(5.0, 25.0), 1)
            fault.param = round(rng.uniform(0.05, 0.8), 2)
        elif kind == "lost_bucket":
            fault.duration = round(rng.uniform(2.0, 12.0), 1)
        elif kind == "disk_full":
            fault.duration = round(rng.uniform(3.0, 20.0), 1)
        faults.append(fault)
        t += max(2.0, rng.expovariate(1.0 / mean_gap_s))
    return faults
