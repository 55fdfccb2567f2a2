"""Writes tests/data/bfl_checkpoint_layouts.json: the tensor names and shapes of Black Forest Labs'
published transformer files (flux1-dev.safetensors, flux2-dev.safetensors, FLUX.2 [klein] 4B's and 9B's),
read from BFL's own model code, so tests/unit/test_bfl_checkpoint_layouts.py checks our single-file
detection and conversion against a source that is not our writer (models.single_file_write*).

Why the model code is the layout: BFL's loaders build the module on the meta device and call
`model.load_state_dict(load_file(checkpoint), strict=False, assign=True)`, so the published keys
are the module's state_dict keys and its shapes at the released params:
- FLUX.1 [dev]: black-forest-labs/flux src/flux/model.py (Flux, FluxParams) and
  src/flux/modules/layers.py, with the params of src/flux/util.py configs["flux-dev"].
- FLUX.2 [dev]: black-forest-labs/flux2 src/flux2/model.py (Flux2), Flux2Params() defaults (the
  params util.py gives "flux.2-dev").
- FLUX.2 [klein] 4B and 9B: the same Flux2 module at klein's sizes, taken from our
  fluxlora.models.families.configs FULL_SIZE["flux2-klein"] (diffusers' convert_flux2_to_diffusers.py
  "klein-4b") and FULL_SIZE["flux2-klein-9b"] (BFL's later Klein9BParams). Klein has no guidance
  embedding: BFL's later model.py builds guidance_in only when Flux2Params.use_guidance_embed; a
  model.py without that field (as at ab7cca6) builds it always, so its guidance_in.* tensors are
  dropped here and the layout's "note" says so. (Ports of BFL's later model.py give Klein4BParams
  the same sizes: 7680 context, 3072 wide, 24 heads, 5 + 20 blocks, and Klein9BParams 12288
  context, 4096 wide, 32 heads, 8 + 24 blocks; both mlp_ratio 3, use_guidance_embed False.)

Nothing of BFL's is copied into this repository: the script imports their modules from checkouts
given on the command line and writes names and shapes only (bf16, as published). To rerun:

    python -m pip install --target /tmp/einops einops   # BFL's modules import einops
    git clone https://github.com/black-forest-labs/flux /tmp/flux
    git clone https://github.com/black-forest-labs/flux2 /tmp/flux2
    PYTHONPATH=/tmp/einops:services python tests/data/generate_bfl_layouts.py \\
        --flux1 /tmp/flux/src --flux1-rev $(git -C /tmp/flux rev-parse --short HEAD) \\
        --flux2 /tmp/flux2/src --flux2-rev $(git -C /tmp/flux2 rev-parse --short HEAD)

Without --flux1 the flux1-dev layout already in --out is kept (a FLUX.2-only rerun). The file
committed was written from black-forest-labs/flux2 at ab7cca6 (klein 9B added on 2026-12-07 by such
a rerun, the other FLUX.2 layouts unchanged) and from the constructors of black-forest-labs/flux's
model.py (728c018) and modules/layers.py (5ce5ffc).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).with_name("bfl_checkpoint_layouts.json")
# FLUX.1 [dev]'s FluxParams in black-forest-labs/flux src/flux/util.py configs["flux-dev"].
FLUX1_DEV_PARAMS: dict[str, Any] = {
    "in_channels": 64, "out_channels": 64, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072,
    "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
    "theta": 10_000, "qkv_bias": True, "guidance_embed": True,
}


# The FLUX.2 layouts, by our full-size config name; klein's params come from that config.
FLUX2_NAMES = ("flux2-dev", "flux2-klein", "flux2-klein-9b")


def klein_params(name: str) -> dict[str, Any]:
    """Flux2Params of a FLUX.2 [klein] size, from our full-size diffusers config `name`."""
    from fluxlora.models.families.configs import FULL_SIZE

    config = FULL_SIZE[name][1]
    return {"in_channels": config["in_channels"], "context_in_dim": config["joint_attention_dim"],
            "hidden_size": config["num_attention_heads"] * config["attention_head_dim"],
            "num_heads": config["num_attention_heads"], "depth": config["num_layers"],
            "depth_single_blocks": config["num_single_layers"], "axes_dim": list(config["axes_dims_rope"]),
            "theta": config["rope_theta"], "mlp_ratio": config["mlp_ratio"]}


def _import(src: str, module: str):
    sys.path.insert(0, str(Path(src).resolve()))
    return importlib.import_module(module)


def _tensors(model: torch.nn.Module, drop: str = "") -> dict[str, list[int]]:
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()
            if not (drop and name.startswith(drop))}


def flux1_layout(src: str, rev: str, layers_rev: str) -> dict[str, Any]:
    flux = _import(src, "flux.model")
    with torch.device("meta"):
        model = flux.Flux(flux.FluxParams(**FLUX1_DEV_PARAMS))
    return {"source": f"black-forest-labs/flux@{rev} src/flux/model.py, @{layers_rev} src/flux/modules/layers.py",
            "params": FLUX1_DEV_PARAMS, "dtype": "bf16", "tensors": _tensors(model)}


def flux2_layouts(src: str, rev: str) -> dict[str, dict[str, Any]]:
    flux2 = _import(src, "flux2.model")
    source = f"black-forest-labs/flux2@{rev} src/flux2/model.py"
    fields = {f.name for f in dataclasses.fields(flux2.Flux2Params)}
    layouts = {}
    for name in FLUX2_NAMES:
        params = flux2.Flux2Params(**(klein_params(name) if name != "flux2-dev" else {}))
        no_guidance = name != "flux2-dev"
        if no_guidance and "use_guidance_embed" in fields:
            params = dataclasses.replace(params, use_guidance_embed=False)
        with torch.device("meta"):
            model = flux2.Flux2(params)
        layout: dict[str, Any] = {"source": source, "params": dataclasses.asdict(params), "dtype": "bf16"}
        if no_guidance and "use_guidance_embed" not in fields:
            layout["note"] = ("this model.py has no use_guidance_embed and builds guidance_in always; klein has "
                              "none (BFL's later use_guidance_embed=False), so guidance_in.* are left out")
        layout["tensors"] = _tensors(model, drop="guidance_in." if no_guidance else "")
        layouts[name] = layout
    return layouts


def to_json(layouts: dict[str, dict[str, Any]]) -> str:
    """The layouts as JSON with one tensor a line, so a diff of a rerun reads tensor by tensor."""
    parts = []
    for name, layout in layouts.items():
        fields = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in layout.items() if k != "tensors"]
        tensors = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in layout["tensors"].items())
        parts.append(f" {json.dumps(name)}: {{\n" + ",\n".join([*fields, f'  "tensors": {{\n{tensors}\n  }}'])
                     + "\n }")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flux1", help="black-forest-labs/flux's src/ (holds the flux package); without it the "
                                         "flux1-dev layout in --out is kept")
    parser.add_argument("--flux1-rev", help="its commit, recorded as the source (with --flux1)")
    parser.add_argument("--flux1-layers-rev", help="the commit of its modules/layers.py, when not --flux1-rev")
    parser.add_argument("--flux2", required=True, help="black-forest-labs/flux2's src/ (holds the flux2 package)")
    parser.add_argument("--flux2-rev", required=True, help="its commit, recorded as the source")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.flux1:
        flux1 = flux1_layout(args.flux1, args.flux1_rev, args.flux1_layers_rev or args.flux1_rev)
    else:
        flux1 = json.loads(args.out.read_text())["flux1-dev"]
    layouts = {"flux1-dev": flux1, **flux2_layouts(args.flux2, args.flux2_rev)}
    args.out.write_text(to_json(layouts))
    for name, layout in layouts.items():
        count = sum(torch.Size(shape).numel() for shape in layout["tensors"].values())
        print(f"{name}: {len(layout['tensors'])} tensors, {count / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
