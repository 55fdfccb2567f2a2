"""Peak GPU memory and s/it of the trainer's own step on the full-size FLUX.1-dev architecture with
random weights (no download), per memory mode and resolution, beside the planner's CPU estimate.

    python bench/gpu_train.py                       # on a CUDA machine: the table for docs/performance.md
    python bench/gpu_train.py --tiny --steps 2      # a smoke run on the CPU with the tiny model

Each mode builds the transformer once in bf16 directly on the device, prepares it with the trainer's
prepare_transformer (LoRA rank 16 on the default attention targets, 8-bit base layers quantised there),
then runs flow_matching_loss + backward + AdamW step (the trainer's functions) on random latents and
text embeddings of the cached-dataset shapes: batch 1, square images, 512 T5 tokens. Peak memory is
torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state and activations);
"reserved" adds the caching allocator's slack, and the CUDA context comes on top of both.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from fluxlora.training.memory.architecture import FLUX1_DEV, ModelShape, shape_from_configs  # noqa: E402
from fluxlora.training.memory.fake_step import step_inputs  # noqa: E402
from fluxlora.training.memory.planner import MemoryPlanner  # noqa: E402
from fluxlora.training.trainer.config import TrainConfig  # noqa: E402
from fluxlora.training.trainer.lora import prepare_transformer  # noqa: E402
from fluxlora.training.trainer.step import (  # noqa: E402
    apply_gradients,
    compile_blocks,
    flow_matching_loss,
    make_optimizer,
    use_trainable_attention,
)

GIB = 2**30
MODES = {  # name: (base_quantization, gradient_checkpointing, compiled blocks, blocks_to_swap)
    "bf16": ("none", False, False, 0),
    "bf16+ckpt": ("none", True, False, 0),
    "fp8+ckpt": ("fp8", True, False, 0),
    "int8+ckpt": ("int8", True, False, 0),
    "bf16+ckpt+compile": ("none", True, True, 0),
    "fp8+ckpt+compile": ("fp8", True, True, 0),
    "int8+ckpt+compile": ("int8", True, True, 0),
    "bf16+ckpt+swap18": ("none", True, False, 18),
    "fp8+ckpt+swap18": ("fp8", True, False, 18),
    "fp8+ckpt+compile+swap18": ("fp8", True, True, 18),
}
DEFAULT_MODES = "bf16,bf16+ckpt,fp8+ckpt,int8+ckpt"


def build(shape: ModelShape, device: torch.device, dtype: torch.dtype, cfg: TrainConfig, compiled=False):
    """The transformer with random weights made on the device in `dtype` (no fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(shape.transformer)
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    params = prepare_transformer(transformer, cfg, device)
    transformer.to(device)
    compile_blocks(transformer, "on" if compiled else "off", device)
    return transformer, params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(transformer, params, shape, cfg, device, dtype, warmup: int, steps: int,
             profile: Path | None = None, label: str = "") -> dict:
    optimizer = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    inputs = [t.to(device) for t in step_inputs(shape, cfg, dtype)]

    def step():
        loss = flow_matching_loss(transformer, *inputs, cfg.guidance, dtype)
        loss.backward()
        apply_gradients(params, optimizer, scaler, cfg.max_grad_norm)
        return loss

    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    result = {"s_per_it": statistics.median(times), "s_per_it_min": min(times), "loss": float(loss)}
    if profile is not None and device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            synchronize(device)
        with profile.open("a") as out:
            out.write(f"\n=== {label} {cfg.resolution}px ===\n")
            out.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    for p in params:
        p.grad = None
    return result


def estimate(planner: MemoryPlanner, shape: ModelShape, cfg: TrainConfig) -> float | None:
    try:
        return planner.estimate(shape, cfg).total_gib
    except Exception as exc:  # noqa: BLE001 - the measurement stands without its estimate
        print(f"  (no estimate: {exc})", flush=True)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument("--resolutions", default="512,768,1024")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (smoke run)")
    parser.add_argument("--cap-gib", type=float, default=18.0,
                        help="after the table, rerun the 8-bit 1024 case with the allocator capped at this")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--device", help="default: cuda, or the CPU with --tiny")
    parser.add_argument("--no-estimate", action="store_true", help="skip the planner's estimates")
    parser.add_argument("--profile", type=Path, help="write the CUDA kernel time table of one step per case here")
    args = parser.parse_args()

    if args.tiny:
        from fluxlora.models.tiny_flux import build_tiny_flux

        pipe = build_tiny_flux(guidance_embeds=True)
        shape = shape_from_configs(dict(pipe.transformer.config), dict(pipe.vae.config))
        device, dtype = torch.device(args.device or "cpu"), torch.float32
    else:
        shape, device, dtype = FLUX1_DEV, torch.device(args.device or "cuda"), torch.bfloat16
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    use_trainable_attention(device)
    resolutions = [int(r) for r in args.resolutions.split(",")]
    planner = MemoryPlanner()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {card}, torch {torch.__version__}; batch 1, rank {args.rank}, 512 text tokens", flush=True)

    rows = []
    for mode in args.modes.split(","):
        quantization, checkpointing, compiled, swap = MODES[mode]
        base_cfg = TrainConfig(resolution=resolutions[0], rank=args.rank, alpha=args.rank, precision="bf16",
                               gradient_checkpointing=checkpointing, base_quantization=quantization,
                               blocks_to_swap=swap)
        started = time.perf_counter()
        transformer, params = build(shape, device, dtype, base_cfg, compiled)
        print(f"{mode}: built and prepared in {time.perf_counter() - started:.0f} s", flush=True)
        for resolution in resolutions:
            cfg = base_cfg.model_copy(update={"resolution": resolution})
            row = {"mode": mode, "resolution": resolution,
                   "estimate_gib": None if args.no_estimate else estimate(planner, shape, cfg)}
            try:
                row.update(run_case(transformer, params, shape, cfg, device, dtype, args.warmup, args.steps,
                                    args.profile if resolution == max(resolutions) else None, mode))
            except torch.OutOfMemoryError:
                row["oom"] = True
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
        del transformer, params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if device.type == "cuda" and args.cap_gib:
        rows.extend(capped_runs(shape, device, dtype, args, max(resolutions)))
    print_table(rows, card)
    if args.json:
        args.json.write_text(json.dumps({"device": card, "torch": torch.__version__, "rows": rows}, indent=1))


def capped_runs(shape, device, dtype, args, resolution) -> list[dict]:
    """The 8-bit modes again with the allocator capped, as on a smaller card: fits, or OOM."""
    rows = []
    total = torch.cuda.get_device_properties(device).total_memory
    for mode in ("fp8+ckpt+compile",):
        quantization, checkpointing, compiled, _ = MODES[mode]
        cfg = TrainConfig(resolution=resolution, rank=args.rank, alpha=args.rank, precision="bf16",
                          gradient_checkpointing=checkpointing, base_quantization=quantization)
        transformer, params = build(shape, device, dtype, cfg, compiled)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / total, device)
        row = {"mode": f"{mode} capped {args.cap_gib:g} GiB", "resolution": resolution}
        try:
            row.update(run_case(transformer, params, shape, cfg, device, dtype, 2, 3))
        except torch.OutOfMemoryError:
            row["oom"] = True
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        del transformer, params
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict], card: str) -> None:
    print(f"\n{card}: peak GiB measured (max allocated / reserved) vs planner estimate (total incl. 1.5 GiB "
          "overhead), s/it median")
    print(f"{'mode':<24}{'res':>6}{'alloc':>8}{'reserved':>10}{'estimate':>10}{'s/it':>8}")
    for r in rows:
        if r.get("oom"):
            print(f"{r['mode']:<24}{r['resolution']:>6}{'OOM':>8}")
            continue
        est = f"{r['estimate_gib']:.1f}" if r.get("estimate_gib") else "-"
        print(f"{r['mode']:<24}{r['resolution']:>6}{r.get('peak_allocated_gib', 0):>8.1f}"
              f"{r.get('peak_reserved_gib', 0):>10.1f}{est:>10}{r['s_per_it']:>8.3f}")


if __name__ == "__main__":
    main()
