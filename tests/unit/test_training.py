"""LoRA training on the tiny FLUX.1: what a run learns, writes, reports and honours."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file
from training_support import quick, train

from fluxlora.evaluation.render import latent_distances_to_image
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_flux import write_tiny_flux
from fluxlora.training.trainer import (
    LORA_WEIGHTS_NAME,
    TrainCallbacks,
    TrainConfig,
    latest_checkpoint,
)
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora.training.trainer.data import BucketBatcher, cache_dataset, training_size
from fluxlora.training.trainer.timesteps import sample_sigmas

CAPTION = "a photo of a red circle"
# Attention and MLP layers and the final layer (a name beside the preset's patterns): enough
# capacity for the tiny model to memorise one image quickly (the preset alone: loss ratio 0.51).
WIDE_TARGETS = [*ATTENTION_AND_MLP_TARGETS, "proj_out"]






def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class Recorder(TrainCallbacks):
    def __init__(self, stop_after: int | None = None):
        super().__init__(
            on_step=lambda *args: self.steps.append(args),
            on_checkpoint=lambda step, path: self.checkpoints.append((step, path)),
            on_sample=lambda step, paths: self.samples.append((step, paths)),
            should_stop=lambda: stop_after is not None and len(self.steps) >= stop_after,
        )
        self.steps, self.checkpoints, self.samples = [], [], []


@pytest.fixture(scope="module")
def circle_dataset(make_dataset, shape_image) -> Path:
    return make_dataset({"circle": (shape_image((64, 64), "red"), CAPTION)})


@pytest.fixture(scope="module")
def overfit(tiny_flux_dir, circle_dataset, tmp_path_factory):
    """200 steps on one captioned image, checkpoints every 100 steps, one sample prompt."""
    cfg = TrainConfig(
        resolution=64,
        max_steps=200,
        learning_rate=1e-3,
        rank=16,
        alpha=16,
        target_modules=WIDE_TARGETS,
        checkpoint_every=100,
        sample_every=100,
        sample_prompts=[CAPTION],
        sample_steps=2,
        seed=0,
    )
    out_dir = tmp_path_factory.mktemp("overfit-run")
    recorder = Recorder()
    outcome = train(cfg, tiny_flux_dir, circle_dataset, out_dir, recorder)
    return cfg, out_dir, outcome, recorder


def test_loss_falls_when_overfitting_one_image(overfit):
    _, _, outcome, _ = overfit
    losses = outcome.losses
    assert len(losses) == outcome.steps_done == 200
    first, last = sum(losses[:40]) / 40, sum(losses[-40:]) / 40
    assert last < 0.5 * first, (first, last)  # measured: about 0.3
    assert outcome.final_loss == losses[-1]
    assert not outcome.stopped


def test_checkpoints_at_every_interval_hold_diffusers_lora_weights(overfit):
    cfg, out_dir, outcome, _ = overfit
    assert [step for step, _ in outcome.checkpoints] == [100, 200]
    for step, directory in outcome.checkpoints:
        assert directory == out_dir / "checkpoints" / f"step-{step:06d}"
        weights = load_file(directory / LORA_WEIGHTS_NAME)
        assert all(k.startswith("transformer.") for k in weights)
        for layer in (
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.ff.net.2",
            "single_transformer_blocks.0.proj_mlp",
        ):
            a = weights[f"transformer.{layer}.lora_A.weight"]
            b = weights[f"transformer.{layer}.lora_B.weight"]
            assert a.shape[0] == b.shape[1] == cfg.rank
            assert a.dtype == torch.float32
    assert outcome.final_checkpoint == out_dir / "checkpoints/step-000200" / LORA_WEIGHTS_NAME
    assert latest_checkpoint(out_dir) == out_dir / "checkpoints/step-000200"


def test_loss_csv_plot_and_samples_are_written(overfit):
    _, out_dir, outcome, _ = overfit
    rows = read_csv(out_dir / "loss.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 201))
    assert float(rows[-1]["loss"]) == pytest.approx(outcome.losses[-1], rel=1e-4)
    assert float(rows[0]["lr"]) == pytest.approx(1e-3)
    assert Image.open(out_dir / "loss.png").format == "PNG"
    assert outcome.loss_csv == out_dir / "loss.csv" and outcome.loss_png == out_dir / "loss.png"

    assert [step for step, _ in outcome.samples] == [100, 200]
    for step, paths in outcome.samples:
        assert paths == [out_dir / "samples" / f"step-{step:06d}-0.png"]
        assert Image.open(paths[0]).size == (64, 64)


def test_callbacks_hear_every_step_checkpoint_and_sample(overfit):
    _, _, outcome, recorder = overfit
    assert [s[0] for s in recorder.steps] == list(range(1, 201))
    assert all(total == 200 for _, total, _, _ in recorder.steps)
    assert [loss for _, _, loss, _ in recorder.steps] == outcome.losses
    assert recorder.checkpoints == outcome.checkpoints
    assert recorder.samples == outcome.samples
    assert outcome.seconds_per_step > 0


def test_trained_lora_pulls_generations_toward_the_training_image(
    overfit, tiny_flux_dir, circle_dataset
):
    _, _, outcome, _ = overfit
    at_zero, at_one = latent_distances_to_image(
        tiny_flux_dir,
        outcome.final_checkpoint,
        circle_dataset / "circle.png",
        CAPTION,
        strengths=(0.0, 1.0),
        seed=0,
        steps=20,
        precision="fp32",
        device="cpu",
    )
    # Measured: about 1.2 at strength 0 and 0.2 at strength 1.
    assert at_one < 0.5 * at_zero, (at_zero, at_one)


def test_saved_lora_carries_its_alpha_to_a_fresh_pipeline(tiny_flux_dir, circle_dataset, tmp_path):
    outcome = train(quick(max_steps=1, rank=4, alpha=8), tiny_flux_dir, circle_dataset, tmp_path)
    with safe_open(outcome.final_checkpoint, "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 8)

    pipe = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)
    pipe.load_lora_weights(outcome.final_checkpoint, adapter_name="trained")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["trained"] == 2.0


def test_bf16_base_weights_train_fp32_lora(tiny_flux_dir, circle_dataset, tmp_path):
    outcome = train(
        quick(max_steps=3, precision="bf16", sample_prompts=[CAPTION], sample_steps=2),
        tiny_flux_dir,
        circle_dataset,
        tmp_path,
    )
    assert all(torch.isfinite(torch.tensor(outcome.losses)))
    assert {t.dtype for t in load_file(outcome.final_checkpoint).values()} == {torch.float32}
    assert len(outcome.samples) == 1


def test_final_step_gets_a_checkpoint_off_the_interval(tiny_flux_dir, circle_dataset, tmp_path):
    outcome = train(quick(max_steps=5, checkpoint_every=3), tiny_flux_dir, circle_dataset, tmp_path)
    assert [step for step, _ in outcome.checkpoints] == [3, 5]
    assert outcome.samples == []  # no sample prompts, no samples


def test_should_stop_ends_the_run_cleanly_and_keeps_a_checkpoint(
    tiny_flux_dir, circle_dataset, tmp_path
):
    recorder = Recorder(stop_after=3)
    outcome = train(
        quick(max_steps=50, checkpoint_every=10), tiny_flux_dir, circle_dataset, tmp_path, recorder
    )
    assert outcome.stopped and outcome.steps_done == 3 and len(outcome.losses) == 3
    assert outcome.checkpoints == [(3, tmp_path / "checkpoints" / "step-000003")]
    assert (tmp_path / "checkpoints/step-000003" / LORA_WEIGHTS_NAME).is_file()


def test_stop_before_the_first_step_writes_nothing(tiny_flux_dir, circle_dataset, tmp_path):
    outcome = train(quick(), tiny_flux_dir, circle_dataset, tmp_path, Recorder(stop_after=0))
    assert outcome.stopped and outcome.steps_done == 0
    assert outcome.checkpoints == [] and outcome.loss_csv is None
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("stage", ["load_flux_pipeline", "cache_dataset", "prepare_transformer"])
def test_a_stop_while_preparing_takes_effect_at_the_next_stage(tiny_flux_dir, circle_dataset, tmp_path,
                                                               monkeypatch, stage):
    """A cancel during 'loading base model' stops before the next stage, not after all of them."""
    from fluxlora.training.trainer import prepare

    asked = []
    real = getattr(prepare, stage)

    def then_cancel(*args, **kwargs):
        out = real(*args, **kwargs)
        asked.append(stage)  # the cancel arrives during this stage
        return out

    monkeypatch.setattr(prepare, stage, then_cancel)
    later = {"load_flux_pipeline": "cache_dataset", "cache_dataset": "prepare_transformer",
             "prepare_transformer": "make_optimizer"}[stage]
    monkeypatch.setattr(prepare, later, lambda *a, **k: pytest.fail(f"{later} ran after the cancel"))
    outcome = train(quick(), tiny_flux_dir, circle_dataset, tmp_path, TrainCallbacks(should_stop=lambda: bool(asked)))
    assert asked == [stage] and outcome.stopped and outcome.steps_done == 0 and outcome.checkpoints == []
    assert not (tmp_path / "checkpoints").exists()


def test_same_seed_repeats_the_run_exactly(tiny_flux_dir, circle_dataset, tmp_path):
    first = train(quick(), tiny_flux_dir, circle_dataset, tmp_path / "a")
    second = train(quick(), tiny_flux_dir, circle_dataset, tmp_path / "b")
    other = train(quick(seed=1), tiny_flux_dir, circle_dataset, tmp_path / "c")
    assert first.losses == second.losses != other.losses
    a, b = load_file(first.final_checkpoint), load_file(second.final_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_resuming_from_a_checkpoint_repeats_the_uninterrupted_run(
    tiny_flux_dir, make_dataset, shape_image, tmp_path, optimizer
):
    dataset = make_dataset(
        {
            "red": (shape_image((64, 64), "red"), "a red circle"),
            "blue": (shape_image((64, 64), "blue", "rectangle"), "a blue square"),
            "green": (shape_image((64, 64), "green"), "a green circle"),
        }
    )
    lr = {"adamw": 1e-3, "prodigy": 1.0}[optimizer]
    cfg = quick(max_steps=6, checkpoint_every=3, lr_scheduler="cosine", caption_dropout=0.3, optimizer=optimizer,
                learning_rate=lr)
    whole = train(cfg, tiny_flux_dir, dataset, tmp_path / "whole")
    resumed = train(
        cfg,
        tiny_flux_dir,
        dataset,
        tmp_path / "resumed",
        resume_from=tmp_path / "whole/checkpoints/step-000003",
    )

    assert resumed.steps_done == 6 and resumed.checkpoints[-1][0] == 6
    assert resumed.losses == whole.losses
    a, b = load_file(whole.final_checkpoint), load_file(resumed.final_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="rank"):
        train(
            quick(max_steps=6, rank=8, optimizer=optimizer, learning_rate=lr),
            tiny_flux_dir,
            dataset,
            tmp_path / "bad",
            resume_from=tmp_path / "whole/checkpoints/step-000003",
        )


def test_mixed_sizes_train_in_buckets_at_the_training_resolution(
    tiny_flux_dir, make_dataset, shape_image, tmp_path
):
    dataset = make_dataset(
        {
            "square": (shape_image((64, 64), "red"), "a red circle"),
            "wide": (shape_image((64, 32), "blue", "rectangle"), "a blue rectangle"),
            "big": (shape_image((128, 128), "green"), "a green circle"),  # downscaled to 64
            "tall": (shape_image((60, 100), "yellow"), "a yellow circle"),  # 38.4 rounds to 32
        }
    )
    pipe = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)
    data = cache_dataset(pipe, dataset, 64, torch.device("cpu"), extra_prompts=["a dog"])

    # The tiny VAE halves each side into 4 latent channels.
    shapes = {s.pair.image.stem: tuple(s.latents.shape) for s in data.samples}
    assert shapes == {
        "big": (4, 32, 32),
        "square": (4, 32, 32),
        "tall": (4, 32, 16),
        "wide": (4, 16, 32),
    }
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert set(data.prompts) == {"a dog"}

    outcome = train(quick(batch_size=2, max_steps=4), tiny_flux_dir, dataset, tmp_path)
    assert outcome.steps_done == 4 and all(torch.isfinite(torch.tensor(outcome.losses)))


def test_training_size_keeps_aspect_with_sides_multiple_of_16():
    assert training_size(64, 64, 512) == (512, 512)
    assert training_size(1200, 800, 1024) == (1024, 688)
    assert training_size(800, 1200, 512) == (336, 512)
    assert training_size(3000, 100, 64) == (64, 16)


def test_batches_never_mix_sizes_and_cover_each_epoch():
    shapes = [(4, 32, 32)] * 5 + [(4, 16, 32)] * 3
    batcher = BucketBatcher(shapes, batch_size=2, seed=0)
    epoch = []
    while batcher.epoch == 0:
        batch = batcher.next()
        if batcher.epoch == 0:
            assert len({shapes[i] for i in batch}) == 1
            epoch += batch
        else:
            break
    assert sorted(epoch) == list(range(8))


@pytest.mark.parametrize("kind", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_timestep_sampling_stays_in_the_unit_interval(kind):
    sigmas = sample_sigmas(
        kind,
        1000,
        torch.Generator().manual_seed(0),
        image_seq_len=1024,
        scheduler_config={"base_shift": 0.5, "max_shift": 1.15},
    )
    assert sigmas.shape == (1000,) and 0 <= sigmas.min() and sigmas.max() <= 1
    if kind == "shift":  # shifted toward noise
        base = sample_sigmas("sigmoid", 1000, torch.Generator().manual_seed(0))
        assert sigmas.mean() > base.mean()


def test_guidance_distilled_model_trains_with_warmup_schedule(tmp_path, circle_dataset):
    model = write_tiny_flux(tmp_path / "dev", guidance_embeds=True)
    outcome = train(
        quick(
            max_steps=4,
            lr_scheduler="linear",
            lr_warmup_steps=2,
            learning_rate=1e-3,
            timestep_sampling="flux_shift",
            gradient_checkpointing=True,
        ),
        model,
        circle_dataset,
        tmp_path / "run",
    )
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "run/loss.csv")]
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert all(torch.isfinite(torch.tensor(outcome.losses)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 100}, "multiple of 16"),
        ({"lr_scheduler": "exotic"}, "lr_scheduler must be one of"),
        ({"learning_rat": 1e-4}, "Extra inputs"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"max_steps": 10, "lr_warmup_steps": 20}, "exceeds max_steps"),
        ({"timestep_sampling": "cubic"}, "timestep_sampling"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(overrides, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**overrides)


def test_config_defaults():
    cfg = TrainConfig()
    assert (cfg.resolution, cfg.max_steps, cfg.learning_rate, cfg.rank, cfg.alpha) == (
        512,
        3000,
        1e-4,
        16,
        16,
    )
    assert cfg.target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    assert (cfg.checkpoint_every, cfg.sample_every, cfg.timestep_sampling) == (750, 750, "sigmoid")


def test_empty_dataset_is_explained(tiny_flux_dir, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="no training images"):
        train(quick(), tiny_flux_dir, tmp_path / "data", tmp_path / "out")
