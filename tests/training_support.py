"""What the trainer's tests share: a quick run's config and train_lora on the CPU."""

from __future__ import annotations

from fluxlora.training.trainer import TrainConfig, train_lora

CIRCLE_CAPTION = "a photo of a red circle"  # the `circle` dataset's (tests/unit/conftest.py)


def quick(**overrides) -> TrainConfig:
    """A 64x64 run of a few steps that skips what the test does not look at."""
    settings = dict(resolution=64, max_steps=4, learning_rate=1e-3, rank=4, alpha=4, checkpoint_every=0,
                    sample_every=0, gradient_checkpointing=False, seed=0)
    return TrainConfig(**{**settings, **overrides})


def quick_flux2(**overrides) -> TrainConfig:
    """quick() with FLUX.2's text encoders cut to 64 tokens (their default 512 is slow on the CPU)."""
    return quick(**{"max_sequence_length": 64, **overrides})


def train(cfg, model_dir, dataset_dir, out_dir, callbacks=None, **kwargs):
    """train_lora on the CPU even where a GPU is present: exact-equality checks need
    deterministic kernels, and the thresholds were measured in fp32."""
    return train_lora(cfg, model_dir, dataset_dir, out_dir, callbacks, device="cpu", **kwargs)


def assert_resume_repeats_the_run(cfg: TrainConfig, model_dir, make_dataset, shape_image, tmp_path) -> None:
    """A run of `cfg` (checkpoint_every=3, max_steps=6) resumed from its step-3 checkpoint repeats the
    uninterrupted run's losses and final LoRA exactly, on a two-image dataset."""
    import torch
    from safetensors.torch import load_file

    dataset = make_dataset({"red": (shape_image((64, 64), "red"), "a red circle"),
                            "blue": (shape_image((64, 64), "blue", "rectangle"), "a blue square")})
    whole = train(cfg, model_dir, dataset, tmp_path / "whole")
    resumed = train(cfg, model_dir, dataset, tmp_path / "resumed",
                    resume_from=tmp_path / "whole/checkpoints/step-000003")
    assert resumed.losses == whole.losses
    a, b = load_file(whole.final_checkpoint), load_file(resumed.final_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)

