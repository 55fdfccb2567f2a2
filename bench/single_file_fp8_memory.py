"""Peak resident memory of loading an fp8 single-file transformer for an 8-bit base (base_quantization
fp8), each way, side by side: kept 8-bit from the file's bytes (models.single_file_fp8) against
upcast whole and then quantised layer by layer (models.single_file_load + base_layers.freeze_base,
the way before, and still the way for base_quantization none/int8).

    .venv/bin/python bench/single_file_fp8_memory.py [--double 1] [--single 1] [--heads 24] [--dtype bf16]

The transformer is FLUX.1's at its full width (24 heads of 128: diffusers' own key converter runs, as
for the real file) with few blocks and random weights, written as a ComfyUI fp8 file. Each way loads
it in a fresh process, which reports its peak resident memory (VmHWM) above what it held before
loading. CPU only; under a minute with the defaults (a 0.5 GiB fp8 file).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 1024 ** 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def load_once(way: str, file: Path, config_dir: Path, dtype: torch.dtype) -> dict:
    """Load `file` one way in this process; its memory and time."""
    from fluxlora.models.base_layers import freeze_base
    from fluxlora.models.families import get_family
    from fluxlora.models.single_file import describe_file
    from fluxlora.models.single_file_fp8 import load_fp8_transformer
    from fluxlora.models.single_file_load import load_single_file_transformer

    model, family = describe_file(file), get_family("flux1-dev")
    before, start = _status_bytes("VmRSS"), time.perf_counter()
    if way == "kept":
        transformer = load_fp8_transformer(file, model, family, config_dir, dtype)
    else:
        transformer = load_single_file_transformer(file, model, family, config_dir, dtype)
        freeze_base(transformer.requires_grad_(False), "fp8", dtype)
    # Read every weight once, as the first move to the GPU will: safetensors maps the file, and bytes
    # passed along untouched are not resident until read.
    held = sum(t.numel() * t.element_size() for t in transformer.state_dict().values()
               if t.view(torch.uint8).max().item() >= 0)
    seconds = time.perf_counter() - start
    return {"peak": _status_bytes("VmHWM") - before, "after": _status_bytes("VmRSS") - before, "held": held,
            "seconds": seconds}


def write_model(root: Path, args) -> tuple[Path, Path]:
    """A full-width FLUX.1 transformer with few blocks as an fp8 ComfyUI file, and its config folder."""
    from diffusers import FluxTransformer2DModel

    from fluxlora.models.single_file_write import write_single_file

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # half the memory and time of initialising in fp32
    try:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double,
                                             num_single_layers=args.single, attention_head_dim=128,
                                             num_attention_heads=args.heads, joint_attention_dim=512,
                                             pooled_projection_dim=768, guidance_embeds=True,
                                             axes_dims_rope=(16, 56, 56))
    finally:
        torch.set_default_dtype(default)
    transformer.save_config(root / "components" / "transformer")
    file = write_single_file(transformer, root / "fp8.safetensors", layout="comfyui", dtype=torch.float8_e4m3fn)
    return file, root / "components"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1 has 19)")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1 has 38)")
    parser.add_argument("--heads", type=int, default=24, help="attention heads of 128 (FLUX.1: 24, width 3072)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="the compute dtype (bf16 on a GPU)")
    parser.add_argument("--child", nargs=3, metavar=("WAY", "FILE", "CONFIG_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        way, file, config_dir = args.child
        print(json.dumps(load_once(way, Path(file), Path(config_dir), DTYPES[args.dtype])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        file, config_dir = write_model(Path(tmp), args)
        print(f"fp8 file: {file.stat().st_size / GIB:.2f} GiB ({args.double} double + {args.single} single blocks, "
              f"width {128 * args.heads}); compute dtype {args.dtype}")
        results = {}
        for way in ("upcast then quantise", "kept 8-bit"):
            child = [sys.executable, __file__, "--dtype", args.dtype, "--child", way.split()[0], str(file),
                     str(config_dir)]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            results[way] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'way':<22}{'peak RSS':>12}{'RSS after':>12}{'model':>10}{'time':>8}")
    for way, r in results.items():
        print(f"{way:<22}{r['peak'] / GIB:>10.2f} G{r['after'] / GIB:>10.2f} G{r['held'] / GIB:>8.2f} G"
              f"{r['seconds']:>7.1f}s")
    upcast, kept = results["upcast then quantise"], results["kept 8-bit"]
    print(f"peak ratio (upcast / kept): {upcast['peak'] / kept['peak']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
