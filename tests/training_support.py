"""What the trainer's tests share: a quick run's config and train_lora on the CPU; the model family
tests' training checks every family passes alike (an overfitting run halves its loss and pulls
generations toward its image, a resume or a run from the encoding cache repeats the run); and their
steps through gRPC (a wrong family refused, a quick run to two checkpoints, its grid). The LoRA
file checks: lora_file_support.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from fluxlora.evaluation.render import latent_distances_to_image
from fluxlora.training.trainer import TrainCallbacks, TrainConfig, TrainOutcome, train_lora
from fluxlora.training.trainer.data import CachedDataset
from fluxlora.training.trainer.encoding_cache import load_encodings
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client.errors import FluxloraClientError

CIRCLE_CAPTION = "a photo of a red circle"  # the `circle` dataset's (tests/unit/conftest.py)


def tiny_latents(pipe) -> torch.Tensor:
    """Two seeded 64 px steps of a tiny pipeline of any family, as latents. FLUX.2's text encoders at
    64 tokens, not their 512 (slow on a CPU); [klein] without classifier-free guidance's second pass."""
    kwargs = {"max_sequence_length": 64} if type(pipe).__name__.startswith("Flux2") else {}
    guidance = 1.0 if type(pipe).__name__ == "Flux2KleinPipeline" else 3.5
    return pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=guidance,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images


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


def assert_resume_repeats_the_run(cfg: TrainConfig, model_dir, dataset, tmp_path) -> None:
    """A run of `cfg` (checkpoint_every=3, max_steps=6) on `dataset` resumed from its step-3 checkpoint
    repeats the uninterrupted run's losses and final LoRA exactly."""
    whole = train(cfg, model_dir, dataset, tmp_path / "whole")
    resumed = train(cfg, model_dir, dataset, tmp_path / "resumed",
                    resume_from=tmp_path / "whole/checkpoints/step-000003")
    assert resumed.losses == whole.losses
    a, b = load_file(whole.final_checkpoint), load_file(resumed.final_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_a_cached_run_repeats_the_run_that_wrote_it(cfg: TrainConfig, model_dir, dataset, tmp_path) -> CachedDataset:
    """A second run of `cfg` from the encoding cache the first wrote encodes nothing and repeats its
    losses; returns what the first stored, for the family's own checks."""
    cache = tmp_path / "encodings.safetensors"
    first = train(cfg, model_dir, dataset, tmp_path / "a", encoding_cache=cache)
    stored = load_encodings(cache, dataset)
    encoded_again: list = []
    second = train(cfg, model_dir, dataset, tmp_path / "b", TrainCallbacks(on_encoded=encoded_again.append),
                   encoding_cache=cache)
    assert encoded_again == [] and second.losses == first.losses
    return stored


class OverfitRun(NamedTuple):
    """A run that overfit one image (or pair) of `model_dir`, with the checks every family's passes."""

    outcome: TrainOutcome
    out_dir: Path
    model_dir: Path

    def assert_the_loss_halved(self, checkpoints: list[int]) -> None:
        """The mean loss over the last 20 steps is under half that of the first 20; the run saved
        `checkpoints`, its sample at the last one, and a LoRA of the transformer's layers only."""
        losses = self.outcome.losses
        first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        assert last < 0.5 * first, (first, last)
        assert [step for step, _ in self.outcome.checkpoints] == checkpoints
        assert (self.out_dir / "samples" / f"step-{checkpoints[-1]:06d}-0.png").is_file()
        keys = load_file(self.outcome.final_checkpoint)
        assert keys and all(k.startswith("transformer.") for k in keys)

    def assert_the_lora_pulls_generations_toward(self, image, prompt: str, **render) -> None:
        """`prompt`'s 20-step generation (seed 0, fp32 on the CPU) with the LoRA at strength 1 lies
        under half as far from `image`'s latents as without it (strength 0)."""
        at_zero, at_one = latent_distances_to_image(self.model_dir, self.outcome.final_checkpoint, image, prompt,
                                                    strengths=(0.0, 1.0), seed=0, steps=20, precision="fp32",
                                                    device="cpu", **render)
        assert at_one < 0.5 * at_zero, (at_zero, at_one)


def overfit_one_image(model_dir, dataset, out_dir, *, steps: int, targets: Sequence[str], prompt: str,
                      learning_rate: float = 1e-3, **settings) -> OverfitRun:
    """`steps` of a rank-16 LoRA on `targets` and the final layer that overfit `dataset`'s one image (or
    pair), with checkpoints half-way and at the end and one 2-step sample of `prompt` at the end."""
    cfg = TrainConfig(resolution=64, max_steps=steps, learning_rate=learning_rate, rank=16, alpha=16,
                      target_modules=[*targets, "proj_out"], checkpoint_every=steps // 2, sample_every=steps,
                      sample_prompts=[prompt], sample_steps=2, seed=0, **settings)
    return OverfitRun(train(cfg, model_dir, dataset, out_dir), out_dir, model_dir)


# A quick run through gRPC: 4 steps of 64 px, checkpoints at steps 2 and 4.
QUICK_RUN = dict(resolution=64, max_steps=4, checkpoint_every=2, sample_every=0, rank=4, learning_rate=1e-3)


def assert_wrong_family_refused(client, dataset: str, model, wrong: str, family: str) -> None:
    """Training `model` (a `family` model) as `wrong` is refused at submit, naming the model and the fix."""
    with pytest.raises(FluxloraClientError) as refused:
        client.train(dataset, base_model=str(model), family=wrong, **QUICK_RUN)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert str(model) in refused.value.message and f"set family to '{family}'" in refused.value.message


def train_to_two_checkpoints(client, dataset: str, model, **family):
    """A QUICK_RUN of `model` (family=... when the run names it) succeeds with checkpoints at steps 2 and 4,
    each stored as both files (diffusers and kohya); returns (its job, its result)."""
    job = client.wait(client.train(dataset, base_model=str(model), **family, **QUICK_RUN))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    result = client.result(job)
    assert [c.step for c in result.checkpoints] == [2, 4]
    for checkpoint in result.checkpoints:
        assert client.store.exists(checkpoint.lora_key) and client.store.exists(checkpoint.kohya_lora_key)
    return job, result


def render_two_strength_grid(client, job):
    """The run's two checkpoints at strengths 0 and 1 render a grid of 4 stored cells; returns its result."""
    grid = client.wait(client.evaluate(job.job_id, [0.0, 1.0], steps=2, width=64, height=64,
                                       image_text_model="none"))
    assert grid.state == jobs_pb2.JOB_STATE_SUCCEEDED, grid.error
    rendered = client.result(grid)
    assert len(rendered.cells) == 4 and all(client.store.exists(c.image_key) for c in rendered.cells)
    return rendered
