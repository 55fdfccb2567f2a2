"""What the trainer's tests share: a quick run's config and train_lora on the CPU."""

from __future__ import annotations

from fluxlora.training.trainer import TrainConfig, train_lora


def quick(**overrides) -> TrainConfig:
    """A 64x64 run of a few steps that skips what the test does not look at."""
    settings = dict(resolution=64, max_steps=4, learning_rate=1e-3, rank=4, alpha=4, checkpoint_every=0,
                    sample_every=0, gradient_checkpointing=False, seed=0)
    return TrainConfig(**{**settings, **overrides})


def train(cfg, model_dir, dataset_dir, out_dir, callbacks=None, **kwargs):
    """train_lora on the CPU even where a GPU is present: exact-equality checks need
    deterministic kernels, and the thresholds were measured in fp32."""
    return train_lora(cfg, model_dir, dataset_dir, out_dir, callbacks, device="cpu", **kwargs)
