"""TrainSpec.optimizer: AdamW (default), 8-bit AdamW (bitsandbytes, CUDA nodes) and Prodigy; the
memory planner counts each one's state; an optimizer whose package is missing is named, not crashed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fluxlora.models.tiny_flux import build_tiny_flux
from fluxlora.training.job import config_from_spec
from fluxlora.training.memory import MemoryPlanner
from fluxlora.training.memory.architecture import shape_from_configs
from fluxlora.training.trainer import TrainConfig, train_lora
from fluxlora.training.trainer.config import OPTIMIZER_STATE_BYTES, not_yet_runnable
from fluxlora.training.trainer.step import make_optimizer
from fluxlora_api.v1 import training_pb2 as pb

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


def test_prodigy_trains_the_lora_down_the_loss(tiny_flux_dir, circle, tmp_path):
    cfg = TrainConfig(resolution=64, max_steps=30, rank=4, alpha=4, checkpoint_every=0, sample_every=0, seed=0,
                      optimizer="prodigy", learning_rate=1.0, target_modules=["to_q", "to_k", "to_v", "ff.net.2"])
    assert not_yet_runnable(cfg) == []
    losses = torch.tensor(train_lora(cfg, tiny_flux_dir, circle, tmp_path, device="cpu").losses)
    assert torch.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean()


def test_each_optimizer_is_built_from_the_config():
    params = [torch.nn.Parameter(torch.zeros(4))]
    assert type(make_optimizer(params, TrainConfig())).__name__ == "AdamW"
    prodigy = make_optimizer(params, TrainConfig(optimizer="prodigy", learning_rate=1.0, lr_warmup_steps=10))
    assert type(prodigy).__name__ == "Prodigy" and prodigy.defaults["safeguard_warmup"]


@pytest.mark.skipif(HAS_BITSANDBYTES, reason="bitsandbytes is installed here")
def test_8bit_adamw_without_bitsandbytes_is_named_with_the_fix():
    [reason] = not_yet_runnable(TrainConfig(optimizer="adamw8bit"))
    assert "bitsandbytes" in reason and "pip install bitsandbytes" in reason


def test_prodigy_takes_learning_rate_1_unless_told_otherwise():
    assert config_from_spec(pb.TrainSpec(optimizer="prodigy")).learning_rate == 1.0
    assert config_from_spec(pb.TrainSpec(optimizer="prodigy", learning_rate=0.5)).learning_rate == 0.5
    assert config_from_spec(pb.TrainSpec()).learning_rate == 1e-4


def test_the_planner_counts_each_optimizers_state():
    # wide enough, with a big enough LoRA, that the state differences show in GiB rounded to 3 places
    pipe = build_tiny_flux(guidance_embeds=True)
    shape = shape_from_configs({**dict(pipe.transformer.config), "num_attention_heads": 8, "attention_head_dim": 64,
                                "axes_dims_rope": (16, 24, 24)}, None)
    planner = MemoryPlanner()
    base = TrainConfig(resolution=64, rank=256, alpha=256, precision="fp32")
    trainable = planner.step_memory(shape, base).trainable_bytes // 4
    assert trainable > 0
    adamw = planner.estimate(shape, base).step_peak_gib
    assert trainable * 6 / 2**30 > 0.005  # 8-bit AdamW saves 6 bytes per parameter
    for name in ("adamw8bit", "prodigy"):
        estimate = planner.estimate(shape, base.model_copy(update={"optimizer": name}))
        delta = trainable * (OPTIMIZER_STATE_BYTES[name] - OPTIMIZER_STATE_BYTES["adamw"]) / 2**30
        assert estimate.step_peak_gib == pytest.approx(adamw + delta, abs=1e-3)
        assert name in estimate.mode
