"""The per-process model cache: one load per base model, cleaned after every borrower."""

from __future__ import annotations

import threading

import pytest
import torch

from fluxlora.evaluation.pipelines import ModelCache, pipeline_key, unload_adapters
from fluxlora.evaluation.tiny_models import write_random_lora
from fluxlora.models.loading import load_flux_pipeline


class Loader:
    def __init__(self):
        self.calls = []

    def __call__(self, name):
        self.calls.append(name)
        return {"name": name, "dirty": False}


def test_a_model_loads_once_per_key_and_a_new_key_replaces_it():
    loader = Loader()
    cache = ModelCache(loader)
    for _ in range(3):
        with cache.borrow("a", "model-a") as model:
            assert model["name"] == "model-a"
    assert loader.calls == ["model-a"] and cache.loads == 1
    with cache.borrow("b", "model-b"):
        pass
    with cache.borrow("a", "model-a"):
        pass
    assert loader.calls == ["model-a", "model-b", "model-a"] and cache.loads == 3


def test_every_borrower_gets_a_cleaned_model_even_after_an_error():
    cleaned = []
    cache = ModelCache(Loader(), release=lambda m: cleaned.append(m["name"]))
    with pytest.raises(RuntimeError), cache.borrow("a", "model-a"):
        raise RuntimeError("job failed")
    assert cleaned == ["model-a"]
    with cache.borrow("a", "model-a"):
        pass
    assert cleaned == ["model-a", "model-a"] and cache.loads == 1


def test_a_model_that_cannot_be_cleaned_is_loaded_afresh():
    def release(model):
        raise RuntimeError("adapter stuck")

    cache = ModelCache(Loader(), release=release)
    with cache.borrow("a", "model-a"):
        pass
    with cache.borrow("a", "model-a"):
        pass
    assert cache.loads == 2


def test_borrowers_take_turns():
    cache = ModelCache(Loader())
    inside, overlap = [], []

    def job():
        with cache.borrow("a", "model-a"):
            inside.append(1)
            overlap.append(len(inside))
            threading.Event().wait(0.01)
            inside.pop()

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [1, 1, 1, 1] and cache.loads == 1


def test_unload_adapters_restores_the_plain_base(tiny_flux_dir, tmp_path):
    pipe = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)
    plain = sorted(name for name, _ in pipe.transformer.named_modules())
    lora = write_random_lora(tiny_flux_dir, tmp_path / "lora", seed=1)
    pipe.load_lora_weights(str(lora), adapter_name="left_behind")
    pipe.set_adapters(["left_behind"], [0.8])
    unload_adapters(pipe)
    assert pipe.get_list_adapters() == {}
    assert sorted(name for name, _ in pipe.transformer.named_modules()) == plain


def test_the_pipeline_key_changes_when_the_model_is_rewritten(tiny_flux_dir, tmp_path):
    from fluxlora.models.tiny_flux import write_tiny_flux

    first = pipeline_key(write_tiny_flux(tmp_path / "m", seed=0), "cpu", torch.float32)
    assert first == pipeline_key(tmp_path / "m", "cpu", torch.float32)
    assert first != pipeline_key(tmp_path / "m", "cpu", torch.bfloat16)
    assert first != pipeline_key(tiny_flux_dir, "cpu", torch.float32)
