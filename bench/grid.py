"""How much a grid costs beyond its images, and how often the base model loads.

    .venv/bin/python bench/grid.py [--size 128] [--steps 20] [--checkpoints 4] [--rounds 3] [--device cpu]

On the tiny random FLUX (nothing is downloaded), in one run:
1. grid time / (cells x single-image time), with the single image timed the way one cell renders
   (adapter loaded, prompt already encoded), median of several. The grid time covers everything the
   render does per job: encoding the prompt, loading/unloading each checkpoint's adapter, setting
   strengths, and the strength-0.0 column rendered once for all rows. Printed for the default
   strengths (with 0.0, so below 1 when rendering the shared column once pays off), for strengths
   without 0.0 (the pure switching overhead; target <= 1.1), and with the convergence probe added.
   Render times swing with other load on the machine, so the share of the grid's time spent
   outside image renders (measured inside the same run) is printed too: that is the grid's own cost.
2. base-model loads per job, counted by the pipeline cache, for grid and generate jobs through a
   real evaluation server: the first job on a base loads it once, later jobs reuse it (0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline
from PIL import Image

from fluxlora.common.config import Settings
from fluxlora.common.offline import configure_hf_offline
from fluxlora.common.storage import LocalStore
from fluxlora.evaluation import render
from fluxlora.evaluation.heldout import MAX_IMAGES, prepare_probe, probe_loss
from fluxlora.evaluation.pipelines import PIPELINES, base_pipeline
from fluxlora.evaluation.tiny_models import PROMPT, store_random_run, write_random_lora
from fluxlora.models.tiny_flux import write_tiny_flux
from fluxlora.server.bootstrap import start_server
from fluxlora_client import FluxloraClient

DEFAULT_STRENGTHS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
NONZERO_STRENGTHS = [0.2, 0.4, 0.6, 0.8, 1.0]


def single_image_seconds(pipe: FluxPipeline, lora: Path, args, repeats: int = 3) -> float:
    embedding = render.encode(pipe, PROMPT)
    pipe.load_lora_weights(str(lora), adapter_name="single")
    pipe.set_adapters(["single"], [0.8])
    try:
        render.render_image(pipe, embedding, 0, args.size, args.size, args.steps, None, "pil")  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            render.render_image(pipe, embedding, 0, args.size, args.size, args.steps, None, "pil")
            times.append(time.perf_counter() - start)
    finally:
        pipe.delete_adapters("single")
        pipe.unload_lora_weights()
    return statistics.median(times)


def grid_seconds(pipe, loras, strengths, args, probe=None) -> tuple[float, float, int]:
    """(grid seconds, seconds spent inside image renders, renders): the difference is what the
    grid adds (encoding, adapter switching, the probe), free of the noise in render times."""
    inside = []

    def timed(*a, **kw):
        start = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            inside.append(time.perf_counter() - start)

    generate, render.render_image = render.render_image, timed
    try:
        start = time.perf_counter()
        render.render_panels(
            pipe, loras, strengths, [render.Panel(PROMPT, 0)], args.size, args.size, args.steps, None,
            on_lora=(lambda row: probe_loss(pipe, probe)) if probe is not None else None,
        )
        return time.perf_counter() - start, sum(inside), len(inside)
    finally:
        render.render_image = generate


def ratios(flux: Path, loras, args) -> float:
    """Prints the table; returns the last measured single-image seconds."""
    device, dtype = torch.device(args.device), torch.float32
    with base_pipeline(flux, device, dtype) as pipe:
        probe_images = [(Image.new("RGB", (args.size, args.size), "red"), PROMPT)] * MAX_IMAGES
        probe = prepare_probe(pipe, probe_images, args.size)
        print(f"{args.size}x{args.size}, {args.steps} steps, device {args.device}; median of {args.rounds} rounds, "
              "each timing single images right before its grid")
        print(f"{'strengths':<30} {'cells':>5} {'renders':>7} {'grid s':>7} {'single s':>8} {'ratio':>6} "
              f"{'outside renders':>16}")
        for label, strengths, with_probe in [
            ("0.0..1.0 (default)", DEFAULT_STRENGTHS, False),
            ("0.2..1.0 (no shared 0.0)", NONZERO_STRENGTHS, False),
            ("0.0..1.0 + convergence probe", DEFAULT_STRENGTHS, True),
        ]:
            cells = len(loras) * len(strengths)
            rounds = []
            for _ in range(args.rounds):
                # Side by side: other load on the machine shifts both numbers of a round alike.
                single = single_image_seconds(pipe, loras[0][1], args)
                seconds, rendering, renders = grid_seconds(pipe, loras, strengths, args, probe if with_probe else None)
                rounds.append((seconds / (cells * single), seconds, single, renders, (seconds - rendering) / seconds))
            ratio, seconds, single, renders, outside = sorted(rounds)[len(rounds) // 2]
            print(f"{label:<30} {cells:>5} {renders:>7} {seconds:>7.2f} {single:>8.3f} {ratio:>6.3f} {outside:>15.1%}")
    return single


def loads_per_job(tmp: Path, flux: Path, args, single: float) -> None:
    store = LocalStore(tmp / "store")
    steps = tuple(range(10, 10 * args.checkpoints + 1, 10))
    run = store_random_run(store, flux, run_id="trn-bench0000001", steps=steps, resolution=args.size)
    PIPELINES.clear()
    settings = Settings(store=str(tmp / "unused"), cache_dir=tmp / "cache", device=args.device)
    server = start_server("evaluation", settings, store=store, port=0)
    client = FluxloraClient(evaluation=server.address)
    try:
        jobs = [
            ("grid", lambda: client.evaluate(run["run_id"], steps=args.steps)),
            ("grid (again)", lambda: client.evaluate(run["run_id"], steps=args.steps, seed=1)),
            ("generate", lambda: client.generate(PROMPT, loras=[{"run_id": run["run_id"]}], steps=args.steps)),
        ]
        print(f"\nwhole jobs through gRPC (grid: {args.checkpoints} checkpoints x 6 strengths, convergence probe, "
              "no image-text model); job s / (images x single s) uses the last single-image time above")
        for label, submit in jobs:
            before = PIPELINES.loads
            start = time.perf_counter()
            result = client.result(client.wait(submit()))
            seconds = time.perf_counter() - start
            images = len(result.cells) if hasattr(result, "cells") else len(result.images)
            print(f"  {label:<14} base-model loads {PIPELINES.loads - before}   {seconds:6.2f} s   "
                  f"{images} images   ratio {seconds / (images * single):.3f}")
    finally:
        client.close()
        server.stop(grace=1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    configure_hf_offline()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        flux = write_tiny_flux(tmp / "flux")
        loras = [(f"step {i}", write_random_lora(flux, tmp / f"lora{i}", seed=i)) for i in range(args.checkpoints)]
        single = ratios(flux, loras, args)
        loads_per_job(tmp, flux, args, single)
    return 0


if __name__ == "__main__":
    sys.exit(main())
