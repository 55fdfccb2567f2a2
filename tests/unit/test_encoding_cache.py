"""The encoded dataset cache: a second run on the same images, captions, model and resolution reads
the latents and text embeddings back instead of loading the text encoders and encoding again."""

from __future__ import annotations

import shutil

import pytest
import torch

from fluxlora.training.trainer import TrainCallbacks, TrainConfig, train_lora
from fluxlora.training.trainer import prepare as prepare_module
from fluxlora.training.trainer.data import find_pairs
from fluxlora.training.trainer.encoding_cache import encoding_key, load_encodings, save_encodings

PROMPT = "a photo of a red circle"


@pytest.fixture(scope="module")
def dataset(make_dataset, shape_image):
    return make_dataset({
        "circle": (shape_image((64, 64), "red"), PROMPT),
        "square": (shape_image((64, 48), "blue", "rectangle"), "a blue square"),
    })


def quick(**overrides) -> TrainConfig:
    return TrainConfig(**{"resolution": 64, "max_steps": 3, "rank": 4, "alpha": 4, "checkpoint_every": 0,
                          "sample_every": 0, "seed": 0, "gradient_checkpointing": False,
                          "sample_prompts": ["a red circle on white"], **overrides})


def test_a_second_run_reads_the_encodings_and_trains_the_same(tiny_flux_dir, dataset, tmp_path, monkeypatch):
    cache = tmp_path / "encodings.safetensors"
    written = []
    first = train_lora(quick(), tiny_flux_dir, dataset, tmp_path / "first",
                       TrainCallbacks(on_encoded=written.append), device="cpu", encoding_cache=cache)
    assert written == [cache] and cache.is_file()

    loaded_with = []
    real_load = prepare_module.load_flux_pipeline

    def spy(*args, **kwargs):
        loaded_with.append(kwargs.get("text_encoders", True))
        return real_load(*args, **kwargs)

    def no_encoding(*_args, **_kwargs):
        raise AssertionError("the dataset was encoded again")

    monkeypatch.setattr(prepare_module, "load_flux_pipeline", spy)
    monkeypatch.setattr(prepare_module, "cache_dataset", no_encoding)
    again = []
    second = train_lora(quick(), tiny_flux_dir, dataset, tmp_path / "second",
                        TrainCallbacks(on_encoded=again.append), device="cpu", encoding_cache=cache)
    assert loaded_with == [False] and again == []  # no text encoders, nothing re-written
    assert second.losses == pytest.approx(first.losses, rel=1e-6)


def test_saved_encodings_round_trip(tiny_flux_dir, dataset, tmp_path):
    from fluxlora.models.loading import load_flux_pipeline
    from fluxlora.training.trainer.data import cache_dataset

    pipe = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)
    cached = cache_dataset(pipe, dataset, 64, torch.device("cpu"), max_sequence_length=32, extra_prompts=["x"])
    back = load_encodings(save_encodings(cached, tmp_path / "c.safetensors"), dataset)
    assert [s.pair for s in back.samples] == [s.pair for s in cached.samples]
    for a, b in zip(back.samples, cached.samples, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.text.prompt_embeds, b.text.prompt_embeds)
        assert torch.equal(a.text.pooled, b.text.pooled)
    assert torch.equal(back.text_ids, cached.text_ids)
    assert torch.equal(back.empty_text.prompt_embeds, cached.empty_text.prompt_embeds)
    assert set(back.prompts) == {"x"} and torch.equal(back.prompts["x"].pooled, cached.prompts["x"].pooled)
    assert not list(tmp_path.glob("*.partial"))


def test_the_key_changes_with_whatever_the_tensors_depend_on(dataset, tmp_path, shape_image):
    pairs = find_pairs(dataset)
    base = dict(model_identity="store://models/flux1-dev@abc", resolution=512, max_sequence_length=512,
                extra_prompts=["ohwx"])
    key = encoding_key(pairs, **base)
    assert encoding_key(find_pairs(dataset), **base) == key  # deterministic
    for change in ({"model_identity": "other"}, {"resolution": 768}, {"max_sequence_length": 256},
                   {"extra_prompts": ["ohwx", "more"]}):
        assert encoding_key(pairs, **{**base, **change}) != key

    edited = tmp_path / "edited"
    shutil.copytree(dataset, edited)
    (edited / "circle.txt").write_text("a photo of a crimson circle")
    assert encoding_key(find_pairs(edited), **base) != key
    repainted = tmp_path / "repainted"
    shutil.copytree(dataset, repainted)
    shape_image((64, 64), "green").save(repainted / "circle.png")
    assert encoding_key(find_pairs(repainted), **base) != key


def test_a_broken_cache_file_costs_an_encoding_not_the_run(tiny_flux_dir, dataset, tmp_path, caplog):
    cache = tmp_path / "encodings.safetensors"
    cache.write_bytes(b"not a safetensors file")
    written = []
    outcome = train_lora(quick(max_steps=1), tiny_flux_dir, dataset, tmp_path / "run",
                         TrainCallbacks(on_encoded=written.append), device="cpu", encoding_cache=cache)
    assert outcome.steps_done == 1 and written == [cache]
    assert "ignoring the encoding cache" in caplog.text
    assert load_encodings(cache, dataset).samples  # replaced by a good one
