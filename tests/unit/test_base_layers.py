"""The frozen block layers stored to save GPU memory: 8-bit weights (base_quantization fp8 / int8) with
per-channel scales upcast for each use, and swapped blocks (blocks_to_swap) kept in CPU memory and
copied for each use; LoRA training on top unchanged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fluxlora.models.base_layers import FrozenLinear, freeze_base, quantize_rows, swapped_block_names
from fluxlora.models.tiny_flux import build_tiny_flux
from fluxlora.training.memory.architecture import shape_from_configs
from fluxlora.training.memory.fake_step import step_inputs
from fluxlora.training.trainer import train_lora
from fluxlora.training.trainer.config import TrainConfig, not_yet_runnable
from fluxlora.training.trainer.lora import prepare_transformer
from fluxlora.training.trainer.step import compile_blocks, flow_matching_loss

KINDS = ["fp8", "int8"]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def flux_like_weight(rows: int = 256, cols: int = 512) -> torch.Tensor:
    """FLUX.1's block weights are small (std ~0.02) with a few larger rows."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, cols, generator=g) * 0.02 * torch.linspace(0.2, 3.0, rows)[:, None]


@pytest.mark.parametrize("kind, bound", [("fp8", 0.04), ("int8", 0.01)])
def test_rows_round_trip_within_the_format_precision(kind, bound):
    weight = flux_like_weight()
    quantized, scale = quantize_rows(weight, kind)
    assert quantized.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[kind]
    assert scale.shape == (weight.shape[0], 1)
    assert relative_error(quantized.float() * scale, weight) < bound


def test_per_row_scales_beat_a_plain_fp8_cast_on_small_weights():
    weight = flux_like_weight() * 0.05  # deep in e4m3's subnormal range when cast as is
    quantized, scale = quantize_rows(weight, "fp8")
    plain = weight.to(torch.float8_e4m3fn).float()
    assert relative_error(quantized.float() * scale, weight) < relative_error(plain, weight) / 4


@pytest.mark.parametrize("kind", KINDS)
def test_an_8bit_linear_computes_what_the_full_linear_does(kind):
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256).requires_grad_(False)
    linear.weight.copy_(flux_like_weight())
    x = torch.randn(8, 512)
    layer = FrozenLinear.from_linear(linear, kind, torch.float32)
    assert isinstance(layer, torch.nn.Linear) and layer.weight.element_size() == 1
    assert not layer.weight.requires_grad and torch.equal(layer.bias, linear.bias)
    assert relative_error(layer(x), linear(x)) < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_blocks_keep_the_transformer_output_and_train_only_the_lora(kind):
    pipe = build_tiny_flux(guidance_embeds=True)
    shape = shape_from_configs(dict(pipe.transformer.config), dict(pipe.vae.config))
    cfg = TrainConfig(resolution=64, rank=4, alpha=4, precision="fp32", gradient_checkpointing=True,
                      target_modules=["to_q", "to_k", "to_v", "ff.net.2"])
    reference = build_tiny_flux(guidance_embeds=True).transformer.requires_grad_(False)
    prepare_transformer(reference, cfg.model_copy(update={"base_quantization": "none"}))
    transformer = pipe.transformer.requires_grad_(False)
    params = prepare_transformer(transformer, cfg.model_copy(update={"base_quantization": kind}))

    layers = [m for m in transformer.modules() if isinstance(m, FrozenLinear)]
    block_linears = [m for name, m in reference.named_modules()
                     if type(m) is torch.nn.Linear and name.startswith(("transformer_blocks", "single_"))
                     and ".lora_" not in name]
    assert len(layers) == len(block_linears) > 0
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert all(not p.requires_grad for m in layers for p in m.parameters())
    # the LoRA wraps the 8-bit layer, so its output is base(x) + lora(x) as before
    assert isinstance(transformer.transformer_blocks[0].attn.to_q.base_layer, FrozenLinear)

    inputs = step_inputs(shape, cfg, torch.float32)
    torch.manual_seed(1)
    loss = flow_matching_loss(transformer, *inputs, cfg.guidance, torch.float32)
    exact = flow_matching_loss(reference, *inputs, cfg.guidance, torch.float32)
    assert abs(loss.item() - exact.item()) < 0.05 * exact.item()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_nothing_is_quantized_without_the_option():
    transformer = build_tiny_flux().transformer.requires_grad_(False)
    assert freeze_base(transformer, "none", torch.float32) == 0
    assert not any(isinstance(m, FrozenLinear) for m in transformer.modules())


@pytest.fixture(scope="module")
def circle_dataset(make_dataset, shape_image):
    return make_dataset({"circle": (shape_image((64, 64), "red"), "a photo of a red circle")})


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_on_an_8bit_base_trains_and_saves_a_full_precision_lora(kind, tiny_flux_dir, circle_dataset, tmp_path):
    cfg = TrainConfig(resolution=64, max_steps=12, learning_rate=1e-3, rank=4, alpha=4, checkpoint_every=0,
                      sample_every=0, seed=0, base_quantization=kind, target_modules=["to_q", "to_k", "to_v"])
    assert not_yet_runnable(cfg) == []
    outcome = train_lora(cfg, tiny_flux_dir, circle_dataset, tmp_path, device="cpu")
    losses = torch.tensor(outcome.losses)
    assert torch.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean()  # overfitting one image: the loss falls
    saved = load_file(outcome.final_checkpoint)
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    assert not any("base_layer" in key for key in saved)


@pytest.mark.slow
def test_compiled_blocks_compute_the_eager_step():
    """compile_blocks fuses each block's elementwise work (1.6x on an H100); it must not change the step."""
    pipe = build_tiny_flux(guidance_embeds=True)
    shape = shape_from_configs(dict(pipe.transformer.config), dict(pipe.vae.config))
    cfg = TrainConfig(resolution=64, rank=4, alpha=4, precision="fp32", gradient_checkpointing=True,
                      base_quantization="fp8")
    inputs = step_inputs(shape, cfg, torch.float32)
    results = []
    for mode in ("off", "on"):
        transformer = build_tiny_flux(guidance_embeds=True).transformer.requires_grad_(False)
        params = prepare_transformer(transformer, cfg)
        assert compile_blocks(transformer, mode, torch.device("cpu")) is (mode == "on")
        loss = flow_matching_loss(transformer, *inputs, cfg.guidance, torch.float32)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in params]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert torch.allclose(eager, compiled, rtol=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(eager_grads, compiled_grads, strict=True))


def test_blocks_compile_by_default_only_on_cuda():
    transformer = build_tiny_flux().transformer
    assert compile_blocks(transformer, "auto", torch.device("cpu")) is False
    assert TrainConfig().compile_blocks == "auto"


def small_flux(seed: int = 0) -> torch.nn.Module:
    """3 double and 4 single blocks: the fewest that allow swapping (two of each kind stay)."""
    from diffusers import FluxTransformer2DModel

    config = {**dict(build_tiny_flux(guidance_embeds=True).transformer.config), "num_layers": 3,
              "num_single_layers": 4}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel.from_config(config).requires_grad_(False)


@pytest.mark.parametrize("kind", ["none", "fp8"])
def test_swapped_blocks_compute_the_same_step_with_weights_outside_the_module(kind):
    model = small_flux()
    shape = shape_from_configs(dict(model.config), None)
    cfg = TrainConfig(resolution=64, rank=4, alpha=4, precision="fp32", gradient_checkpointing=True,
                      base_quantization=kind, target_modules=["to_q", "to_k", "to_v", "proj_out"])
    inputs = step_inputs(shape, cfg, torch.float32)
    results = []
    for swap in (0, 2):
        transformer = small_flux()
        params = prepare_transformer(transformer, cfg.model_copy(update={"blocks_to_swap": swap}))
        loss = flow_matching_loss(transformer, *inputs, cfg.guidance, torch.float32)
        loss.backward()
        results.append((transformer, loss.detach(), [p.grad for p in params]))
    (_, loss, grads), (swapped_model, swapped_loss, swapped_grads) = results
    assert torch.equal(loss, swapped_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, swapped_grads, strict=True))

    assert swapped_block_names(swapped_model, 2) == {"transformer_blocks.2", "single_transformer_blocks.2",
                                                     "single_transformer_blocks.3"}
    swapped = [m for m in swapped_model.modules() if isinstance(m, FrozenLinear) and m.swapped]
    assert swapped and all(m.weight is None and m.host_weight.device.type == "cpu" for m in swapped)
    # module.to() moves parameters and buffers only: the swapped weights stay where they are
    host_dtypes = {m.host_weight.dtype for m in swapped}
    swapped_model.to(torch.float64)
    assert {m.host_weight.dtype for m in swapped} == host_dtypes
    kept = swapped_model.transformer_blocks[0].attn.to_q.base_layer
    assert not isinstance(kept, FrozenLinear) or not kept.swapped


def test_more_blocks_than_the_model_allows_are_refused_by_name():
    with pytest.raises(ValueError, match="blocks_to_swap=3 is more than this model allows"):
        swapped_block_names(small_flux(), 3)
