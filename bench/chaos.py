"""The standing chaos run: a mixed load of pipeline jobs against real server processes on both stores
while a seeded fault schedule injects faults; then the invariants are checked.

    python bench/chaos.py --minutes 30 --seed 7 --store both    # the standing run (15 min per store)
    python bench/chaos.py --seconds 180 --seed 3 --store s3     # a short one
    python bench/chaos.py ... --json out.json --strict          # figures as JSON; every violation fails
    python bench/chaos.py --seconds 300 --replicas 2            # two server processes per service, one store

Per store: the four servers as `python -m fluxlora.server.cli serve <service>` processes (training
with FLUXLORA_RUNNER=process, as `fluxlora up`), each on a port kept across its generations; a local
directory on a small tmpfs (mounted in a private mount namespace: the run re-executes itself under
`unshare`), or a bucket on moto's S3 server reached through a TCP proxy the faults control.

Faults (drawn from random.Random(seed) before the load starts, printed, replayable; bench/chaoslib/
schedule.py): SIGKILL of a server (its worker children left to notice), SIGTERM then the same command
again (half the time started while the old generation still stops), SIGKILL of a training worker,
S3 outages (connections reset; some longer than the store's retries), a slow S3, a lost bucket (404
NoSuchBucket for a while), a full local disk, bursts of hostile requests (bad numbers, 1 MB strings,
unknown and ../ ids, a reused request_id with another spec).

Load: --clients threads each run preprocess -> caption -> approve -> train (tiny FLUX, 64 px, a few
steps) -> evaluate with request_ids, resubmitting the same id while answered UNAVAILABLE; every
accepted job gets a watcher (the SDK's watch) that records the events it saw.

Afterwards (the faults over, every server up, at most --settle seconds): the invariants of
bench/chaoslib/invariants.py, each with its count and examples; those in EXPECTED_FAILURES (fixes not
merged yet) are reported but only fail the run with --strict. Exit code 1 on any other violation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=None, help="minutes of faults in all (split over stores)")
    parser.add_argument("--seconds", type=float, default=180.0, help="seconds of faults in all (if no --minutes)")
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: from the clock)")
    parser.add_argument("--store", choices=["local", "s3", "both"], default="both")
    parser.add_argument("--replicas", type=int, default=1, help="server processes per service on one store")
    parser.add_argument("--clients", type=int, default=2, help="client threads running pipelines")
    parser.add_argument("--mean-gap", type=float, default=20.0, help="mean seconds between faults")
    parser.add_argument("--settle", type=float, default=240.0, help="seconds for the system to settle afterwards")
    parser.add_argument("--disk-mib", type=int, default=64, help="size of the local store's file system")
    parser.add_argument("--max-rss-mib", type=int, default=3072, help="memory bound of a server process")
    parser.add_argument("--json", default="", help="write the figures here as JSON too")
    parser.add_argument("--strict", action="store_true", help="expected failures count as violations too")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs) afterwards")
    args = parser.parse_args(argv)
    if args.minutes is not None:
        args.seconds = args.minutes * 60
    if args.seed is None:
        args.seed = int(time.time()) % 100_000
    return args


def in_private_namespace(argv: list[str]) -> None:
    """Re-executes this run in a private mount namespace (so the small tmpfs of the local store
    vanishes with it); returns only where that is impossible, or already done."""
    if os.environ.get("FLUXLORA_CHAOS_NS") or not shutil.which("unshare"):
        return
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    command = ["unshare", *user, "--mount", "--propagation", "private", sys.executable, *argv]
    probe = subprocess.run(["unshare", *user, "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return
    os.environ["FLUXLORA_CHAOS_NS"] = "1"
    sys.stdout.flush()
    os.execvp("unshare", command)


def main(argv=None) -> int:
    args = parse(argv)
    stores = ["local", "s3"] if args.store == "both" else [args.store]
    if "local" in stores:
        in_private_namespace([str(Path(__file__).resolve()), *(argv or sys.argv[1:]), "--seed", str(args.seed)])

    from chaoslib.run import StoreRun, report
    from chaoslib.system import SmallDisk

    from fluxlora.demo.sample_data import write_sample_photos
    from fluxlora.models.tiny_captioner import write_tiny_florence2
    from fluxlora.models.tiny_flux import write_tiny_flux

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fluxlora-chaos-"))
    print(f"chaos run: seed {args.seed}, stores {', '.join(stores)}, {args.seconds:.0f}s of faults in all, "
          f"{args.clients} clients; working folder {work}", flush=True)
    models = {"flux": write_tiny_flux(work / "models" / "tiny-flux"),
              "florence2": write_tiny_florence2(work / "models" / "tiny-florence2")}
    photos = []
    for i in range(3):
        write_sample_photos(work / "photos" / str(i), count=3, seed=100 + i)
        photos.append(work / "photos" / str(i))
    disk_reason = ""
    if "local" in stores:
        disk_reason = ("not in a private mount namespace" if not os.environ.get("FLUXLORA_CHAOS_NS")
                       else SmallDisk.mount(work / "local-disk", args.disk_mib))
    results = []
    try:
        for kind in stores:
            run = StoreRun(kind, args.seconds / len(stores), args.seed, work, models, photos, args, disk_reason)
            results.append(run.run())
    finally:
        if disk_reason == "" and "local" in stores:
            subprocess.run(["umount", str(work / "local-disk")], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}")
    return report(results, args.seed, args, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
