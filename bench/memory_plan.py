"""Estimated peak GPU memory of training a LoRA on a full-size transformer (FLUX.1-dev by default,
or any full-size config with --family), per resolution and memory mode, computed on the CPU by the memory
planner (no weights, no GPU).

    .venv/bin/python bench/memory_plan.py [--family flux1-dev|flux1-kontext|chroma|flux2-dev|flux2-klein|...]
                                          [--modes "bf16 + checkpointing,..."]
                                          [--resolutions 512,768,1024] [--rank 16] [--batch-size 1]
                                          [--target-gib 24] [--json out.json]

--family takes any full-size config of models/families/configs.py (`fluxlora models write-config`): a
family, or a family's other size such as flux2-klein-9b. FLUX.2's attention LoRA also covers its
single blocks' fused layers (Family.attention_targets).

Each planned mode runs one fake training step (three shallow ones extrapolated to the full depth,
~2-4 s on one core); block swapping is arithmetic on top of a fake step, so its rows cost nothing
more. Totals include the planner's fixed CUDA overhead; "step" is the fake step's own peak and
"weights" the resident parameters. Batch 1, 512 text tokens, LoRA on to_q/to_k/to_v/to_out.0 unless
told otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from fluxlora.models.families import planning_family
from fluxlora.models.families.configs import FULL_SIZE, full_size_family
from fluxlora.training.memory import CUDA_OVERHEAD_GIB, MemoryPlanner
from fluxlora.training.memory.architecture import shape_from_configs
from fluxlora.training.trainer.config import TrainConfig

MODES = {
    "bf16": {"precision": "bf16", "gradient_checkpointing": False},
    "bf16 + checkpointing": {"precision": "bf16", "gradient_checkpointing": True},
    "bf16 + checkpointing + swap 18": {"precision": "bf16", "gradient_checkpointing": True, "blocks_to_swap": 18},
    "fp8 base": {"precision": "bf16", "gradient_checkpointing": False, "base_quantization": "fp8"},
    "fp8 base + checkpointing": {"precision": "bf16", "gradient_checkpointing": True, "base_quantization": "fp8"},
    "int8 base + checkpointing": {"precision": "bf16", "gradient_checkpointing": True, "base_quantization": "int8"},
    "fp8 base + checkpointing + swap 18": {"precision": "bf16", "gradient_checkpointing": True,
                                           "base_quantization": "fp8", "blocks_to_swap": 18},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux1-dev", choices=list(FULL_SIZE))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated names of MODES")
    parser.add_argument("--resolutions", default="512,768,1024")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--target-gib", type=float, default=24.0, help="mark the cases that fit this GPU")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    resolutions = [int(r) for r in args.resolutions.split(",")]
    modes = {name: MODES[name] for name in args.modes.split(",")}
    pipeline, transformer, vae = FULL_SIZE[args.family]
    shape = shape_from_configs(transformer, vae, {"_class_name": pipeline})
    targets = planning_family(full_size_family(args.family)).attention_targets
    extra = {"target_modules": list(targets)} if targets else {}

    planner = MemoryPlanner()
    rows = []
    started = time.perf_counter()
    for mode, options in modes.items():
        for resolution in resolutions:
            cfg = TrainConfig(resolution=resolution, rank=args.rank, alpha=args.rank, batch_size=args.batch_size,
                              **options, **extra)
            case_started = time.perf_counter()
            estimate = planner.estimate(shape, cfg)
            rows.append({**estimate.as_dict(), "mode": mode, "resolution": resolution,
                         "seconds": round(time.perf_counter() - case_started, 1)})

    print(f"{args.family} transformer, batch {args.batch_size}, rank {args.rank}, 512 text tokens; GiB, "
          f"totals include {CUDA_OVERHEAD_GIB} GiB CUDA overhead; * = fits {args.target_gib:g} GiB")
    width = max(len(m) for m in modes)
    header = "".join(f"{r:>26}" for r in resolutions)
    print(f"{'mode':<{width}}{header}")
    print(f"{'':<{width}}" + "".join(f"{'total (step, weights)':>26}" for _ in resolutions))
    for mode in modes:
        cells = []
        for row in (r for r in rows if r["mode"] == mode):
            mark = "*" if row["total_gib"] <= args.target_gib else " "
            cells.append(f"{row['total_gib']:7.1f}{mark} ({row['step_peak_gib']:5.1f}, {row['weights_gib']:5.1f})")
        print(f"{mode:<{width}}" + "".join(f"{c:>26}" for c in cells))
    fake_steps = sorted({r["seconds"] for r in rows if r["seconds"] > 0.5})
    print(f"{len(rows)} cases in {time.perf_counter() - started:.0f} s; a fake step took "
          f"{min(fake_steps, default=0):.1f}-{max(fake_steps, default=0):.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
