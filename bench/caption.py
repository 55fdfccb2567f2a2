"""Captioning speed on the tiny Florence-2: batched throughput versus one image per generate()
call, and proof that a captioning service loads its model once per process, not per request.

    .venv/bin/python bench/caption.py                      # tiny random Florence-2, CPU
    .venv/bin/python bench/caption.py --model /models/Florence-2-large --device cuda --images 64

Both measurements run side by side in one process, so the ratios compare like with like; absolute
numbers depend on the machine (and, for the tiny model, mostly measure per-call overhead, which is
exactly what batching removes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fluxlora.captioning.captioners import load_captioner
from fluxlora.captioning.dataset import generate_captions


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.effect_noise((size, size), 20 + i % 60).convert("RGB")
        path = folder / f"img-{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def throughput(model: Path, paths: list[Path], batch_size: int, device: str, max_new_tokens: int,
               rounds: int) -> tuple[float, list[float]]:
    """Images per second (median of rounds) captioning all paths batch_size at a time."""
    captioner = load_captioner("florence2", model, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               device=device)
    generate_captions(paths[:batch_size], captioner, batch_size)  # warm-up: first-call allocations
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        generate_captions(paths, captioner, batch_size)
        rates.append(len(paths) / (time.perf_counter() - start))
    return statistics.median(rates), rates


def loads_per_process(model: Path, images: list[Path], jobs: int, max_new_tokens: int, root: Path) -> None:
    """Runs `jobs` caption jobs through a real captioning server and counts model loads."""
    from fluxlora.captioning import job as caption_job
    from fluxlora.common.config import Settings
    from fluxlora.common.storage import LocalStore
    from fluxlora.server.bootstrap import start_server
    from fluxlora_client import FluxloraClient

    store = LocalStore(root / "store")
    dataset_id = "ds-bench0000000"
    for path in images:
        store.put_file(f"datasets/{dataset_id}/images/{path.name}", path, "image/png")
    store.put_json(f"datasets/{dataset_id}/manifest.json", {"images": []})
    settings = Settings(store=str(store.root), cache_dir=root / "cache")
    server = start_server("captioning", settings, store=store, port=0)
    client = FluxloraClient(captioning=server.address)
    try:
        before = caption_job.captioner_loads()
        seconds = []
        for i in range(jobs):
            start = time.perf_counter()
            client.wait(client.caption(dataset_id, "ohwx", model=str(model), max_new_tokens=max_new_tokens,
                                       batch_size=8, request_id=f"bench-{i}"))
            seconds.append(time.perf_counter() - start)
        loads = caption_job.captioner_loads() - before
    finally:
        client.close()
        server.stop(grace=1.0)
    start = time.perf_counter()
    load_captioner("florence2", model, batch_size=8, max_new_tokens=max_new_tokens, device=settings.device)
    load_seconds = time.perf_counter() - start
    print(f"\nmodel loads in one captioning server process: {loads} for {jobs} caption jobs "
          f"({'once per process' if loads == 1 else 'NOT once per process'})")
    print("  job seconds: " + ", ".join(f"{s:.2f}" for s in seconds) + " (the first one loads the model)")
    print(f"  one model load alone: {load_seconds:.2f} s, which every job would pay if loading were per request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Florence-2 directory (default: a tiny random one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=3, help="caption jobs for the load count")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps a busy machine steady)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="fluxlora-bench-") as tmp:
        root = Path(tmp)
        model = args.model
        if model is None:
            from fluxlora.models.tiny_captioner import write_tiny_florence2

            model = write_tiny_florence2(root / "tiny-florence2")
        paths = make_images(root / "images", args.images, args.size)
        print(f"captioning {len(paths)} images of {args.size}px with {model.name} on {args.device} "
              f"({args.threads} CPU thread(s)), up to {args.max_new_tokens} new tokens, median of {args.rounds}")
        one, one_rates = throughput(model, paths, 1, args.device, args.max_new_tokens, args.rounds)
        many, many_rates = throughput(model, paths, args.batch_size, args.device, args.max_new_tokens, args.rounds)
        for size, rate, rates in ((1, one, one_rates), (args.batch_size, many, many_rates)):
            print(f"batch size {size}:  {rate:7.1f} images/s  (rounds: {', '.join(f'{r:.1f}' for r in rates)})")
        print(f"batched / one at a time: {many / one:.2f}x")
        loads_per_process(model, paths[:8], args.jobs, args.max_new_tokens, root)


if __name__ == "__main__":
    main()
