"""Peak GPU memory and s/it of the trainer's own step on a full-size model of each family with random
weights (no download), per memory mode and resolution, beside the planner's CPU estimate.

    python bench/gpu_train.py --family all          # every family, default modes: ~6 min on one H100
    python bench/gpu_train.py                       # FLUX.1 [dev] alone
    python bench/gpu_train.py --family chroma --modes bf16,bf16+ckpt,fp8+ckpt --steps 8 --warmup 3
    python bench/gpu_train.py --tiny --family all --steps 1   # a smoke run on the CPU with the tiny models

Families: flux1-dev, flux1-kontext, chroma, flux2-dev, flux2-klein, their full-size transformer configs
from models/families/configs.py (FULL_SIZE); --tiny takes each family's tiny test model
(`fluxlora models write-tiny`). Each mode builds the family's transformer once in bf16 directly on the
device, prepares it with the trainer's prepare_transformer (LoRA rank 16 on the default attention
preset as the family maps it, 8-bit base layers quantised there), then runs the trainer's
flow_matching_loss + backward + AdamW step with the family object deciding the transformer's inputs.
The tensors are the planner's fake step's (training/memory/fake_step.step_inputs): random latents
in the family's VAE layout (FLUX.2: 32 channels, patchified to 128 by the family's pack; 4-axis ids)
and text embeddings of the family's width; batch 1, square images, 512 text tokens (64 with --tiny).
Kontext's control image (as large as the target) is appended to the image tokens; Chroma has no
pooled vector and gets a text mask (a 77-token caption) as the trainer gives it, which the planner's
fake step leaves out.

Peak memory is torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state and
activations); "reserved" adds the caching allocator's slack, and the CUDA context comes on top of
both. The planner's estimates run in worker processes on the CPU while the GPU measures (a full-size
FLUX.2 [dev] fake step takes a minute or more on one core). Before it starts, the run prints its
rough time budget on an H100 (a model fitted to the FLUX.1 rows of docs/performance.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from fluxlora.models.families import Family, planning_family  # noqa: E402
from fluxlora.models.families.configs import FULL_SIZE, full_size_family  # noqa: E402
from fluxlora.training.memory.architecture import ModelShape, read_model_shape, shape_from_configs  # noqa: E402
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
# One full-size config per family, its first released size (FLUX.2 [klein] 4B, not the 9B: its rows would be
# labelled by family, and the default run must fit an H100's eight minutes).
FAMILIES = tuple(name for name in FULL_SIZE if full_size_family(name) == name)
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
# Two modes every family fits on an 80 GB card (FLUX.2 [dev] in bf16 only with checkpointing): the
# bf16 base and the 8-bit one a 24 GB card trains with. The old FLUX.1 table also had bf16 and
# int8+ckpt (--modes bf16,bf16+ckpt,fp8+ckpt,int8+ckpt --steps 8 --warmup 3).
DEFAULT_MODES = "bf16+ckpt,fp8+ckpt"
CAPTION_TOKENS = 77  # Chroma's text mask: a caption this long and the first padding token attend

# The rough H100 time model of the budget (eager steps), fitted to docs/performance.md's FLUX.1 rows:
# a fixed cost per block (kernel launches, LoRA and modulation work) plus the matmul FLOPs at an
# effective rate; building takes a few seconds plus random init and quantisation per parameter.
H100_FLOPS = 700e12
SECONDS_PER_BLOCK = 0.008
COMPILE_SECONDS = 45.0
BUILD_SECONDS, BUILD_SECONDS_PER_BILLION = 3.0, 1.0


def family_shape(family: str, tiny: bool) -> ModelShape:
    """The full-size architecture of `family`, or its tiny test model's (written and read back as
    `fluxlora models write-tiny` writes it)."""
    if not tiny:
        pipeline, transformer, vae = FULL_SIZE[family]
        return shape_from_configs(transformer, vae, {"_class_name": pipeline})
    from fluxlora.models.tiny_family import write_tiny_family

    with tempfile.TemporaryDirectory() as folder:
        return read_model_shape(str(write_tiny_family(family, Path(folder) / family)))


def build(shape: ModelShape, device: torch.device, dtype: torch.dtype, cfg: TrainConfig, compiled=False):
    """The family's transformer with random weights made on the device in `dtype` (no fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = planning_family(shape.family).transformer_class.from_config(shape.transformer)
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    params = prepare_transformer(transformer, cfg, device)
    transformer.to(device)
    compile_blocks(transformer, "on" if compiled else "off", device)
    return transformer, params


def step_tensors(shape: ModelShape, cfg: TrainConfig, dtype: torch.dtype, family: Family, device: torch.device):
    """The fake step's inputs on the device, and the keyword inputs the trainer adds for this family:
    a control image as large as the target for editing families, a text mask (which families
    without one ignore)."""
    inputs = [t.to(device) for t in step_inputs(shape, cfg, dtype)]
    latents = inputs[0]
    control = torch.randn_like(latents) if family.takes_control_image else None
    mask = torch.zeros(cfg.batch_size, cfg.max_sequence_length, dtype=dtype, device=device)
    mask[:, : CAPTION_TOKENS + 1] = 1
    return inputs, {"family": family, "control": control, "mask": mask}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(transformer, params, shape, cfg, device, dtype, warmup: int, steps: int,
             profile: Path | None = None, label: str = "") -> dict:
    optimizer = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    inputs, family_inputs = step_tensors(shape, cfg, dtype, planning_family(shape.family), device)

    def step():
        loss = flow_matching_loss(transformer, *inputs, cfg.guidance, dtype, **family_inputs)
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
    result = {"s_per_it": statistics.median(times), "s_per_it_min": min(times), "loss": float(loss.detach())}
    if profile is not None and device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            synchronize(device)
        with profile.open("a") as out:
            out.write(f"\n=== {shape.family} {label} {cfg.resolution}px ===\n")
            out.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    for p in params:
        p.grad = None
    return result


def train_config(shape: ModelShape, mode: str, resolution: int, rank: int, text_tokens: int = 512) -> TrainConfig:
    """The run a case measures: `mode`'s memory options, bf16, the default (attention) LoRA preset,
    which prepare_transformer maps to the family's own layers (FLUX.2's fused single-block ones)."""
    quantization, checkpointing, _, swap = MODES[mode]
    return TrainConfig(resolution=resolution, rank=rank, alpha=rank, precision="bf16", family=shape.family,
                       max_sequence_length=text_tokens, gradient_checkpointing=checkpointing,
                       base_quantization=quantization, blocks_to_swap=swap)


# --- the planner's estimates, on the CPU beside the GPU work ---

def _estimate(shape: ModelShape, cfg: TrainConfig) -> float | None:
    try:
        return MemoryPlanner().estimate(shape, cfg).total_gib
    except Exception as exc:  # noqa: BLE001 - the measurement stands without its estimate
        print(f"  (no estimate for {shape.family} {cfg.base_quantization} {cfg.resolution}: {exc})", flush=True)
        return None


def _quiet_worker() -> None:
    torch.set_num_threads(1)  # fake tensors compute nothing; one thread each leaves the cores to the others


class Estimates:
    """The planner's estimate per case. With workers, each is a fake step in its own spawned process
    (no CUDA there), started at once so the largest models' slow fake steps overlap the GPU work;
    without, each is computed when submitted (the tiny models' take a second)."""

    def __init__(self, workers: int):
        context = multiprocessing.get_context("spawn")
        self._pool = context.Pool(workers, initializer=_quiet_worker) if workers else None
        self._pending: dict[tuple, object] = {}

    def submit(self, key: tuple, shape: ModelShape, cfg: TrainConfig) -> None:
        if self._pool is None:
            self._pending[key] = _estimate(shape, cfg)
        else:
            self._pending[key] = self._pool.apply_async(_estimate, (shape, cfg))

    def get(self, key: tuple, deadline: float) -> float | None:
        pending = self._pending.get(key)
        if pending is None or isinstance(pending, float):
            return pending
        try:
            return pending.get(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[attr-defined]
        except multiprocessing.TimeoutError:
            return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()  # estimates still running past the deadline are dropped
            self._pool.join()


# --- the time budget ---

def transformer_size(shape: ModelShape) -> tuple[int, int, int]:
    """(parameters, blocks, attention width) of the architecture, counted on the meta device."""
    config = shape.transformer
    with torch.device("meta"):
        model = planning_family(shape.family).transformer_class.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    blocks = config["num_layers"] + config["num_single_layers"]
    return params, blocks, config["num_attention_heads"] * config["attention_head_dim"]


def step_seconds(shape: ModelShape, size: tuple[int, int, int], mode: str, resolution: int,
                 text_tokens: int = 512) -> float:
    """A rough H100 time of one eager training step: linear layers 2 FLOPs per parameter and token
    per pass (forward, input gradients, and the recomputed forward with checkpointing: frozen base
    weights get no weight gradients), attention 4 L^2 D per block per pass (backward twice)."""
    params, blocks, width = size
    image_tokens = (resolution // shape.vae_scale_factor // 2) ** 2
    if planning_family(shape.family).takes_control_image:
        image_tokens *= 2
    tokens = image_tokens + text_tokens
    checkpointing = MODES[mode][1]
    linear_passes, attention_passes = (3, 4) if checkpointing else (2, 3)
    flops = linear_passes * 2 * params * tokens + attention_passes * 4 * tokens**2 * width * blocks
    return blocks * SECONDS_PER_BLOCK + flops / H100_FLOPS


def time_budget(shape: ModelShape, modes: list[str], resolutions: list[int], warmup: int, steps: int,
                text_tokens: int = 512) -> float:
    """Seconds the family's cases should take on an H100: builds (and compiles) plus every step."""
    size = transformer_size(shape)
    seconds = 0.0
    for mode in modes:
        seconds += BUILD_SECONDS + BUILD_SECONDS_PER_BILLION * size[0] / 1e9
        seconds += COMPILE_SECONDS if MODES[mode][2] else 0.0
        seconds += sum((warmup + steps) * step_seconds(shape, size, mode, r, text_tokens) for r in resolutions)
    return seconds


# --- the run ---

def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux1-dev", choices=[*FAMILIES, "all"],
                        help="the family to measure, or all of them in turn")
    parser.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument("--resolutions", help="comma-separated; default 512,768,1024 (with --tiny: 64)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default 2 (with --tiny: 1)")
    parser.add_argument("--text-tokens", type=int, help="text sequence length; default 512 (with --tiny: 64)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="the tiny test models on the CPU (smoke run)")
    parser.add_argument("--cap-gib", type=float,
                        help="after each family's table, rerun fp8+ckpt+compile at the largest resolution with the "
                             "allocator capped at this many GiB, as on a smaller card (e.g. 18)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--device", help="default: cuda, or the CPU with --tiny")
    parser.add_argument("--no-estimate", action="store_true", help="skip the planner's estimates")
    parser.add_argument("--estimate-workers", type=int,
                        help="processes computing the estimates beside the GPU work (default: all cores but two; "
                             "0 computes each before its case, the default with --tiny)")
    parser.add_argument("--estimate-wait", type=float, default=120.0,
                        help="seconds to wait for estimates still running after the last measurement")
    parser.add_argument("--profile", type=Path, help="write the CUDA kernel time table of one step per case here")
    args = parser.parse_args(argv)
    args.families = list(FAMILIES) if args.family == "all" else [args.family]
    args.mode_list = args.modes.split(",")
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    default_resolutions, default_warmup, default_tokens = ("64", 1, 64) if args.tiny else ("512,768,1024", 2, 512)
    args.resolution_list = [int(r) for r in (args.resolutions or default_resolutions).split(",")]
    args.warmup = default_warmup if args.warmup is None else args.warmup
    args.text_tokens = args.text_tokens or default_tokens
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.tiny:
        device, dtype = torch.device(args.device or "cpu"), torch.float32
    else:
        device, dtype = torch.device(args.device or "cuda"), torch.bfloat16
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    use_trainable_attention(device)
    shapes = {family: family_shape(family, args.tiny) for family in args.families}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {card}, torch {torch.__version__}; batch 1, rank {args.rank}, {args.text_tokens} text tokens; "
          f"{args.warmup} warm-up + {args.steps} timed steps per case", flush=True)
    budgets = {} if args.tiny else {f: time_budget(s, args.mode_list, args.resolution_list, args.warmup, args.steps,
                                                   args.text_tokens) for f, s in shapes.items()}
    if budgets:
        print("time budget on an H100 (rough): " + ", ".join(f"{f} ~{s:.0f} s" for f, s in budgets.items())
              + f"; total ~{sum(budgets.values()) / 60:.1f} min", flush=True)

    estimates = start_estimates(args, shapes, device)
    rows, elapsed = [], {}
    try:
        for family, shape in shapes.items():
            started = time.perf_counter()
            rows.extend(measure_family(shape, args, device, dtype))
            if device.type == "cuda" and args.cap_gib:
                rows.extend(capped_runs(shape, device, dtype, args, max(args.resolution_list)))
            elapsed[family] = time.perf_counter() - started
        deadline = time.monotonic() + args.estimate_wait
        for row in rows:
            row["estimate_gib"] = estimates.get((row["family"], row["mode"], row["resolution"]), deadline)
    finally:
        estimates.close()

    for family in shapes:
        print_table([r for r in rows if r["family"] == family], card, family)
        budget = f" (budget ~{budgets[family]:.0f} s)" if family in budgets else ""
        print(f"{family}: {elapsed[family]:.0f} s on the device{budget}")
    if args.json:
        args.json.write_text(json.dumps({"device": card, "torch": torch.__version__, "warmup": args.warmup,
                                         "steps": args.steps, "seconds": elapsed, "budget_seconds": budgets,
                                         "rows": rows}, indent=1))
    return rows


def start_estimates(args, shapes: dict[str, ModelShape], device: torch.device) -> Estimates:
    """Every case's estimate submitted up front, largest model first (its fake steps are the slowest)."""
    cases = [(f, m, r) for f in shapes for m in args.mode_list for r in args.resolution_list]
    if args.no_estimate:
        cases = []
    workers = args.estimate_workers
    if workers is None:
        workers = 0 if device.type != "cuda" else max(1, min(len(cases), (os.cpu_count() or 4) - 2))
    estimates = Estimates(workers if cases else 0)
    sizes = {f: transformer_size(s)[0] for f, s in shapes.items()}
    for family, mode, resolution in sorted(cases, key=lambda c: -sizes[c[0]]):
        shape = shapes[family]
        cfg = train_config(shape, mode, resolution, args.rank, args.text_tokens)
        estimates.submit((family, mode, resolution), shape, cfg)
    return estimates


def measure_family(shape: ModelShape, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every mode x resolution of one family, each mode built once; OOM (building or stepping) is a row."""
    rows = []
    for mode in args.mode_list:
        base_cfg = train_config(shape, mode, args.resolution_list[0], args.rank, args.text_tokens)
        started = time.perf_counter()
        try:
            transformer, params = build(shape, device, dtype, base_cfg, MODES[mode][2])
        except torch.OutOfMemoryError:
            release(device)
            rows.extend({"family": shape.family, "mode": mode, "resolution": r, "oom": "build"}
                        for r in args.resolution_list)
            print(f"{shape.family} {mode}: out of memory while building", flush=True)
            continue
        release(device)  # what building held (a bf16 layer quantised to 8 bits) is no peak of the step
        print(f"{shape.family} {mode}: built and prepared in {time.perf_counter() - started:.0f} s", flush=True)
        for resolution in args.resolution_list:
            cfg = base_cfg.model_copy(update={"resolution": resolution})
            row: dict = {"family": shape.family, "mode": mode, "resolution": resolution}
            try:
                row.update(run_case(transformer, params, shape, cfg, device, dtype, args.warmup, args.steps,
                                    args.profile if resolution == max(args.resolution_list) else None, mode))
            except torch.OutOfMemoryError:
                row["oom"] = "step"
            release(device)
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
        del transformer, params
        release(device)
    return rows


def capped_runs(shape: ModelShape, device, dtype, args, resolution) -> list[dict]:
    """The 8-bit compiled mode again with the allocator capped, as on a smaller card: fits, or OOM."""
    rows = []
    total = torch.cuda.get_device_properties(device).total_memory
    for mode in ("fp8+ckpt+compile",):
        cfg = train_config(shape, mode, resolution, args.rank, args.text_tokens)
        transformer, params = build(shape, device, dtype, cfg, MODES[mode][2])
        release(device)
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / total, device)
        row: dict = {"family": shape.family, "mode": f"{mode} capped {args.cap_gib:g} GiB", "resolution": resolution}
        try:
            row.update(run_case(transformer, params, shape, cfg, device, dtype, 2, 3))
        except torch.OutOfMemoryError:
            row["oom"] = "step"
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        del transformer, params
        release(device)
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict], card: str, family: str) -> None:
    print(f"\n{family} on {card}: peak GiB measured (max allocated / reserved) vs planner estimate (total incl. "
          "1.5 GiB overhead), s/it median")
    print(f"{'mode':<24}{'res':>6}{'alloc':>8}{'reserved':>10}{'estimate':>10}{'s/it':>8}")
    for r in rows:
        est = f"{r['estimate_gib']:.1f}" if r.get("estimate_gib") else "-"
        if r.get("oom"):
            print(f"{r['mode']:<24}{r['resolution']:>6}{'OOM':>8}{'':>10}{est:>10}")
            continue
        print(f"{r['mode']:<24}{r['resolution']:>6}{r.get('peak_allocated_gib', 0):>8.1f}"
              f"{r.get('peak_reserved_gib', 0):>10.1f}{est:>10}{r['s_per_it']:>8.3f}")


if __name__ == "__main__":
    main()
