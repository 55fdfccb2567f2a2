"""The memory planner's fake step, extrapolated from shallow probes vs run at the full depth, side by
side in one run: seconds each, the speed-up, and whether the estimates agree.

    .venv/bin/python bench/planner_depth.py [--families flux1-dev,chroma,...] [--resolution 512]

For every full-size config (models/families/configs.py: each family's, FLUX.2 [klein] 9B's too) and
a few memory modes: the planner's estimate (measure_step, PROBE_BLOCKS-deep probes, extrapolated
part by part) and the whole model's fake step (probe_blocks=None). The peak columns are GiB; "diff" is in bytes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fluxlora.models.families.configs import FULL_SIZE
from fluxlora.training.memory.architecture import shape_from_configs
from fluxlora.training.memory.fake_step import measure_step
from fluxlora.training.trainer.config import TrainConfig

MODES = {
    "bf16": {"gradient_checkpointing": False},
    "bf16 + checkpointing": {"gradient_checkpointing": True},
    "fp8 base + checkpointing": {"gradient_checkpointing": True, "base_quantization": "fp8"},
}


def timed(shape, cfg: TrainConfig, probe_blocks):
    started = time.perf_counter()
    step = measure_step(shape, cfg, torch.bfloat16, **probe_blocks)
    return step, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FULL_SIZE))
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args(argv)
    print(f"{'family':14} {'mode':26} {'probed GiB':>10} {'full GiB':>9} {'diff':>7} {'probed s':>9} {'full s':>7} "
          f"{'speed-up':>8}")
    speedups = []
    for family in args.families.split(","):
        pipeline, transformer, vae = FULL_SIZE[family]
        shape = shape_from_configs(transformer, vae, {"_class_name": pipeline})
        for name, options in MODES.items():
            cfg = TrainConfig(resolution=args.resolution, precision="bf16", **options)
            probed, probed_s = timed(shape, cfg, {})
            full, full_s = timed(shape, cfg, {"probe_blocks": None})
            speedups.append(full_s / probed_s)
            print(f"{family:14} {name:26} {probed.peak_bytes / 2**30:10.3f} {full.peak_bytes / 2**30:9.3f} "
                  f"{probed.peak_bytes - full.peak_bytes:7d} {probed_s:9.1f} {full_s:7.1f} {full_s / probed_s:7.1f}x",
                  flush=True)
    print(f"speed-up {min(speedups):.1f}x-{max(speedups):.1f}x over {len(speedups)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
