"""bench/gpu_train.py measures the trainer's step of every model family on a GPU: each family's step gets
its own inputs (FLUX.2's 128-channel patches, Kontext's control tokens, Chroma without a pooled vector),
the same code runs on the CPU with each tiny model as a smoke test, and the default run of all five
full-size families is budgeted to fit 8 minutes of an H100."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fluxlora.models.families import FAMILY_NAMES, get_family

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_train.py"
spec = importlib.util.spec_from_file_location("gpu_train", BENCH)
gpu_train = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu_train
spec.loader.exec_module(gpu_train)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_family_runs_on_the_cpu_with_its_tiny_model(family, tmp_path):
    out = tmp_path / "out.json"
    rows = gpu_train.main(["--tiny", "--family", family, "--steps", "1", "--json", str(out)])
    modes = gpu_train.DEFAULT_MODES.split(",")
    assert [(r["family"], r["mode"], r["resolution"]) for r in rows] == [(family, m, 64) for m in modes]
    for row in rows:
        assert "oom" not in row and math.isfinite(row["loss"]) and row["s_per_it"] > 0
        assert row["estimate_gib"] > 0  # the planner estimated the same case
    assert json.loads(out.read_text())["rows"] == rows


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_full_size_family_steps_on_its_own_inputs(family):
    shape = gpu_train.family_shape(family, tiny=False)
    config = shape.transformer
    cfg = gpu_train.train_config(shape, "fp8+ckpt", 64, rank=16)
    inputs, extra = gpu_train.step_tensors(shape, cfg, torch.bfloat16, get_family(family), torch.device("cpu"))
    latents, _, _, prompt_embeds, pooled, _ = inputs
    tokens = extra["family"].pack(latents)
    assert shape.family == family and tokens.shape[-1] == config["in_channels"]  # FLUX.2: 32 channels -> 128
    assert prompt_embeds.shape[-1] == config["joint_attention_dim"]
    assert pooled.shape[-1] == config.get("pooled_projection_dim", 0)  # none for Chroma and FLUX.2
    assert (extra["control"] is not None) == (family == "flux1-kontext")
    if extra["control"] is not None:
        assert extra["control"].shape == latents.shape  # as large as the target


def test_the_default_run_of_every_family_fits_eight_minutes_of_an_h100():
    args = gpu_train.parse_args(["--family", "all"])
    assert sorted(args.families) == sorted(FAMILY_NAMES) and args.resolution_list == [512, 768, 1024]
    seconds = sum(gpu_train.time_budget(gpu_train.family_shape(f, tiny=False), args.mode_list,
                                        args.resolution_list, args.warmup, args.steps, args.text_tokens)
                  for f in args.families)
    assert seconds < 7 * 60  # a minute left for starting, imports and the last estimates
