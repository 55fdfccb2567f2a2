"""Rendering on a 24 GB card: the evaluation service loads FLUX.1-dev's transformer with its block
weights in fp8 and each model on the GPU only while it runs; larger GPUs and the CPU get the plain
pipeline. LoRAs load onto and unload from the 8-bit layers as onto plain ones."""

from __future__ import annotations

import pytest
import torch

from fluxlora.common.config import Settings
from fluxlora.evaluation.job_support import InferenceLoading, inference_loading
from fluxlora.evaluation.render import render_cells
from fluxlora.models.base_layers import FrozenLinear
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.training.trainer import TrainConfig, train_lora

CUDA = torch.device("cuda", 0)
GRID = dict(prompt="a red circle", seed=3, width=64, height=64, steps=2, guidance=None)


@pytest.mark.parametrize("gpu_gib, expected", [
    (24.0, InferenceLoading("fp8", True)),  # RTX 4090
    (48.0, InferenceLoading("none", False)),  # L40S / A6000
    (80.0, InferenceLoading("none", False)),  # H100
])
def test_auto_picks_fp8_and_offload_below_40_gib(gpu_gib, expected):
    assert inference_loading(Settings(), CUDA, gpu_gib=gpu_gib) == expected


def test_the_cpu_gets_the_plain_pipeline_and_explicit_settings_win():
    assert inference_loading(Settings(), torch.device("cpu")) == InferenceLoading("none", False)
    chosen = Settings(inference_quantization="int8", inference_cpu_offload="off")
    assert inference_loading(chosen, CUDA, gpu_gib=24.0) == InferenceLoading("int8", False)
    assert inference_loading(Settings(inference_cpu_offload="on"), CUDA, gpu_gib=80.0).cpu_offload


def test_an_fp8_transformer_renders_the_grid_close_to_the_full_one_and_unloads_its_loras(
    tiny_flux_dir, make_dataset, shape_image, tmp_path
):
    dataset = make_dataset({"square": (shape_image((64, 64), "blue", "rectangle"), GRID["prompt"])})
    cfg = TrainConfig(resolution=64, max_steps=10, learning_rate=3e-3, rank=8, alpha=8, checkpoint_every=0,
                      sample_every=0, gradient_checkpointing=False, seed=0)
    outcome = train_lora(cfg, tiny_flux_dir, dataset, tmp_path, device="cpu")
    loras = [("step 10", outcome.final_checkpoint)]
    full = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)
    fp8 = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32, base_quantization="fp8")
    assert any(isinstance(m, FrozenLinear) for m in fp8.transformer.modules())
    exact = render_cells(full, loras, [0.0, 1.0], **GRID, output_type="latent")
    approx = render_cells(fp8, loras, [0.0, 1.0], **GRID, output_type="latent")
    for a, b in zip(approx[0], exact[0], strict=True):
        assert float((a - b).norm() / b.norm()) < 0.1
    assert not any("lora_" in name for name, _ in fp8.transformer.named_modules())
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8.transformer.modules() if isinstance(m, FrozenLinear))
