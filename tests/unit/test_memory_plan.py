"""The memory planner: a training step's peak GPU memory, estimated on fake tensors from the model's
config alone, and the options that make a run fit."""

from __future__ import annotations

import pytest
import torch

from fluxlora.common.storage import LocalStore
from fluxlora.models.base_layers import swapped_block_counts
from fluxlora.models.tiny_flux import build_tiny_flux, write_tiny_flux
from fluxlora.training.memory import FLUX1_DEV, MemoryPlanner, read_model_shape
from fluxlora.training.memory import fake_step as fake_step_module
from fluxlora.training.memory.architecture import FLUX1_DEV_TRANSFORMER, shape_from_configs
from fluxlora.training.memory.fake_step import measure_step
from fluxlora.training.memory.live_bytes import LiveBytes
from fluxlora.training.memory.planner import max_blocks_to_swap
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.lora import prepare_transformer
from fluxlora.training.trainer.step import apply_gradients, flow_matching_loss, make_optimizer
from fluxlora_api.shared.errors import FailedPrecondition


@pytest.fixture(scope="module")
def tiny():
    """A FLUX.1-dev-like tiny model (guidance input), its shape as the planner reads it."""
    pipe = build_tiny_flux(guidance_embeds=True)
    return pipe, shape_from_configs(dict(pipe.transformer.config), dict(pipe.vae.config))


def tiny_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"resolution": 64, "rank": 4, "alpha": 4, "precision": "fp32",
                          "gradient_checkpointing": False, **overrides})


def real_step_peak(pipe, shape, cfg: TrainConfig) -> int:
    """The same training step on real CPU tensors, its live bytes counted the same way."""
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    params = prepare_transformer(transformer, cfg)
    optimizer = make_optimizer(params, cfg, foreach=True)
    tracker = LiveBytes()
    with tracker:
        for tensor in (*transformer.parameters(), *transformer.buffers()):
            tracker.track(tensor)
        for param in params:  # a steady-state step: AdamW's moments exist
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        inputs = fake_step_module.step_inputs(shape, cfg, torch.float32)
        tracker.reset_peak()
        loss = flow_matching_loss(transformer, *inputs, cfg.guidance, torch.float32)
        loss.backward()
        apply_gradients(params, optimizer, torch.amp.GradScaler("cpu", enabled=False), cfg.max_grad_norm)
    return tracker.peak


@pytest.mark.parametrize("checkpointing, quantization", [(False, "none"), (True, "none"), (True, "fp8"),
                                                         (True, "int8")])
def test_fake_step_matches_the_real_step_on_the_cpu(checkpointing, quantization):
    pipe = build_tiny_flux(guidance_embeds=True)
    shape = shape_from_configs(dict(pipe.transformer.config), dict(pipe.vae.config))
    cfg = tiny_cfg(resolution=256, gradient_checkpointing=checkpointing, base_quantization=quantization)
    estimate = measure_step(shape, cfg, torch.float32).peak_bytes
    real = real_step_peak(pipe, shape, cfg)
    assert 0.9 < estimate / real < 1.1, (estimate, real)  # measured: 1.00 and 0.95


def test_weights_are_counted_at_their_parameter_bytes():
    pipe = build_tiny_flux(guidance_embeds=True)
    shape = shape_from_configs(dict(pipe.transformer.config), dict(pipe.vae.config))
    cfg = tiny_cfg()
    step = measure_step(shape, cfg, torch.float32)
    pipe.transformer.requires_grad_(False)
    lora = prepare_transformer(pipe.transformer, cfg)
    tensors = list(pipe.transformer.parameters())
    # every tensor rounded up to the CUDA allocator's 512-byte blocks
    assert step.weight_bytes == sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)
    # at the peak: the weights, the LoRA's gradients and AdamW's two moments, and activations
    lora_bytes = sum(p.numel() * p.element_size() for p in lora)
    assert step.peak_bytes > step.weight_bytes + 3 * lora_bytes


def test_estimate_grows_with_resolution_and_checkpointing_lowers_it(tiny):
    _, shape = tiny
    planner = MemoryPlanner()
    totals = [planner.estimate(shape, tiny_cfg(resolution=r)).step_peak_gib for r in (64, 128, 256)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    with_checkpointing = planner.estimate(shape, tiny_cfg(resolution=256, gradient_checkpointing=True))
    assert with_checkpointing.step_peak_gib < totals[-1]


def test_an_8bit_base_halves_the_block_weights(tiny):
    # wide enough that per-row scales and the allocator's 512-byte rounding are small beside the weights
    _, tiny_shape = tiny
    shape = shape_from_configs({**tiny_shape.transformer, "num_attention_heads": 8, "attention_head_dim": 64,
                                "axes_dims_rope": (16, 24, 24)}, None)
    bf16 = measure_step(shape, tiny_cfg(precision="bf16", gradient_checkpointing=True), torch.bfloat16)
    fp8 = measure_step(shape, tiny_cfg(precision="bf16", gradient_checkpointing=True, base_quantization="fp8"),
                       torch.bfloat16)
    assert fp8.double_block_bytes < 0.6 * bf16.double_block_bytes
    assert fp8.single_block_bytes < 0.6 * bf16.single_block_bytes
    assert fp8.weight_bytes < bf16.weight_bytes


def test_repeated_estimates_come_from_the_cache_in_memory_and_on_disk(tiny, tmp_path, monkeypatch):
    _, shape = tiny
    calls = []
    real_measure = fake_step_module.measure_step

    def counting(*args, **kwargs):
        calls.append(args)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr("fluxlora.training.memory.planner.measure_step", counting)
    first = MemoryPlanner(tmp_path).estimate(shape, tiny_cfg())
    planner = MemoryPlanner(tmp_path)  # a fresh process would start like this
    assert planner.estimate(shape, tiny_cfg()) == first
    # learning rate, steps and alpha do not change the memory of a step
    assert planner.estimate(shape, tiny_cfg(learning_rate=1e-3, max_steps=10, alpha=8)) == first
    assert len(calls) == 1
    planner.estimate(shape, tiny_cfg(rank=8))
    assert len(calls) == 2
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_run_that_fits_has_no_alternatives(tiny):
    _, shape = tiny
    plan = MemoryPlanner().plan(shape, tiny_cfg(), target_gib=24)
    assert plan.fits and plan.alternatives == []
    assert plan.estimate.overhead_gib == 1.5
    assert plan.estimate.total_gib == pytest.approx(plan.estimate.step_peak_gib + 1.5, abs=1e-3)
    assert "1.5 GiB CUDA overhead" in plan.explain()


def test_a_run_that_does_not_fit_lists_changes_that_do(tiny):
    _, shape = tiny
    planner = MemoryPlanner(overhead_gib=0)
    cfg = tiny_cfg(resolution=256)
    heavy = planner.estimate(shape, cfg).total_gib
    light = planner.estimate(shape, tiny_cfg(resolution=256, precision="bf16", gradient_checkpointing=True))
    assert light.total_gib < heavy
    plan = planner.plan(shape, cfg, target_gib=light.total_gib)
    assert not plan.fits
    changes = [a.changes for a in plan.alternatives]
    assert {"precision": "bf16", "gradient_checkpointing": True} in changes
    assert all(a.estimate.total_gib <= plan.target_gib for a in plan.alternatives)
    message = plan.explain()
    assert "Options that fit" in message and "gradient_checkpointing=true" in message


def test_nothing_fits_a_gpu_smaller_than_the_overhead(tiny):
    _, shape = tiny
    plan = MemoryPlanner().plan(shape, tiny_cfg(), target_gib=1.0)
    assert not plan.fits and plan.alternatives == []
    assert "use a GPU with more memory" in plan.explain()


def test_block_swap_is_counted_as_kohya_counts_it():
    assert swapped_block_counts(18) == (9, 18)
    assert swapped_block_counts(35) == (17, 36)
    assert max_blocks_to_swap(FLUX1_DEV) == 35
    tiny_shape = shape_from_configs({**FLUX1_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 1}, None)
    assert max_blocks_to_swap(tiny_shape) == 0


def test_model_shape_is_read_from_config_files_in_a_directory_or_the_store(tmp_path):
    model = write_tiny_flux(tmp_path / "tiny")
    shape = read_model_shape(str(model))
    assert shape.transformer["num_layers"] == 1 and shape.vae_scale_factor == 2
    assert shape.latent_channels == 4

    store = LocalStore(tmp_path / "store")
    store.put_json("models/flux1-dev/transformer/config.json", FLUX1_DEV_TRANSFORMER)
    shape = read_model_shape("store://models/flux1-dev", store)
    assert shape.transformer["num_single_layers"] == 38 and shape.vae_scale_factor == 8

    (tmp_path / "empty").mkdir()
    with pytest.raises(FailedPrecondition, match="transformer/config.json"):
        read_model_shape(str(tmp_path / "empty"))


@pytest.mark.slow
def test_full_size_flux1_dev_at_512_with_checkpointing():
    """The real architecture, 12B parameters, never allocated: about 5-10 s on one core."""
    estimate = MemoryPlanner().estimate(FLUX1_DEV, TrainConfig(resolution=512, gradient_checkpointing=True))
    assert estimate.weights_gib == pytest.approx(22.2, abs=0.1)  # 11.9B parameters in bf16, plus LoRA
    assert 22.5 < estimate.step_peak_gib < 24.5, estimate  # measured 23.2
    assert estimate.total_gib > 24  # a 24 GB card needs an 8-bit base for FLUX.1
