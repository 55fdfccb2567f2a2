"""Where a model comes from: a local directory as it is, or a store prefix ("store://<prefix>")
mirrored once into the local cache, fetched again only when the stored copy changes or an earlier
mirror was interrupted. Runs on both store backends (local directory and S3)."""

from __future__ import annotations

import threading

import pytest

from fluxlora.common.models import check_model_ref, is_store_ref, resolve_model
from fluxlora_api.shared.errors import NotFound

MODEL_FILES = {
    "model_index.json": b'{"_class_name": "FluxPipeline"}',
    "transformer/config.json": b'{"num_layers": 1}',
    "transformer/diffusion_pytorch_model.safetensors": bytes(range(256)) * 16,
}


@pytest.fixture
def stored_model(store):
    """A small model directory under models/tiny/ in the store."""
    for name, data in MODEL_FILES.items():
        store.put_bytes(f"models/tiny/{name}", data)
    return store


@pytest.fixture
def downloads(monkeypatch, store):
    """Every key the store downloads from now on, in order."""
    fetched: list[str] = []
    original = store.get_file

    def spy(key, path):
        fetched.append(key)
        return original(key, path)

    monkeypatch.setattr(store, "get_file", spy)
    return fetched


def mirrored_files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_a_local_directory_is_used_in_place(store, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    assert not is_store_ref(str(model))
    assert resolve_model(str(model), store, tmp_path / "cache") == model
    assert not (tmp_path / "cache").exists()


def test_a_missing_directory_is_not_found_naming_the_path(store, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(NotFound) as err:
        resolve_model(str(missing), store, tmp_path / "cache", "base model")
    assert str(missing) in err.value.message and "base model" in err.value.message


def test_an_empty_ref_without_a_default_is_not_found(store, tmp_path):
    with pytest.raises(NotFound, match="no base model given"):
        resolve_model("", store, tmp_path / "cache", "base model")


def test_a_store_prefix_with_nothing_under_it_is_not_found_naming_the_prefix(store, tmp_path):
    with pytest.raises(NotFound) as err:
        resolve_model("store://models/x", store, tmp_path / "cache", "captioning model")
    assert "models/x/" in err.value.message and "upload" in err.value.message
    with pytest.raises(NotFound):
        check_model_ref("store://models/x", store, "captioning model")
    assert not (tmp_path / "cache").exists()


def test_a_store_prefix_is_mirrored_into_the_cache_once(stored_model, downloads, tmp_path):
    cache = tmp_path / "cache"
    first = resolve_model("store://models/tiny", stored_model, cache)
    assert first.is_dir() and first.is_relative_to(cache)
    assert mirrored_files(first) == MODEL_FILES
    assert sorted(downloads) == sorted(f"models/tiny/{n}" for n in MODEL_FILES)

    downloads.clear()
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    second = resolve_model("store://models/tiny/", stored_model, cache)  # trailing slash: same prefix
    assert second == first
    assert downloads == []
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == mtimes


def test_a_changed_store_copy_is_fetched_again(stored_model, downloads, tmp_path):
    cache = tmp_path / "cache"
    target = resolve_model("store://models/tiny", stored_model, cache)
    stored_model.put_bytes("models/tiny/tokenizer/vocab.json", b'{"a": 0}')
    downloads.clear()

    again = resolve_model("store://models/tiny", stored_model, cache)
    assert again == target
    assert "models/tiny/tokenizer/vocab.json" in downloads
    assert mirrored_files(again) == {**MODEL_FILES, "tokenizer/vocab.json": b'{"a": 0}'}

    downloads.clear()
    resolve_model("store://models/tiny", stored_model, cache)
    assert downloads == []


def test_an_interrupted_mirror_is_fetched_again(stored_model, downloads, tmp_path):
    cache = tmp_path / "cache"
    target = resolve_model("store://models/tiny", stored_model, cache)
    # An interrupted download: some files there (one truncated), but no completion marker.
    markers = [p for p in target.iterdir() if p.name.startswith(".fluxlora-complete")]
    assert len(markers) == 1
    markers[0].unlink()
    (target / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"trunc")
    downloads.clear()

    again = resolve_model("store://models/tiny", stored_model, cache)
    assert again == target
    assert sorted(downloads) == sorted(f"models/tiny/{n}" for n in MODEL_FILES)
    assert mirrored_files(again) == MODEL_FILES

    downloads.clear()
    resolve_model("store://models/tiny", stored_model, cache)
    assert downloads == []


def test_different_prefixes_get_different_cache_directories(stored_model, tmp_path):
    stored_model.put_bytes("models/other/model_index.json", b"{}")
    cache = tmp_path / "cache"
    tiny = resolve_model("store://models/tiny", stored_model, cache)
    other = resolve_model("store://models/other", stored_model, cache)
    assert tiny != other
    assert mirrored_files(other) == {"model_index.json": b"{}"}


def test_a_reupload_of_the_same_size_is_fetched_again(store, tmp_path):
    from fluxlora.common.models import resolve_model

    store.put_bytes("models/same/weights.bin", b"AAAA")
    first = resolve_model("store://models/same/", store, tmp_path / "cache")
    assert (first / "weights.bin").read_bytes() == b"AAAA"
    import time

    time.sleep(0.01)  # a new local mtime / S3 ETag
    store.put_bytes("models/same/weights.bin", b"BBBB")
    second = resolve_model("store://models/same/", store, tmp_path / "cache")
    assert (second / "weights.bin").read_bytes() == b"BBBB"


def test_files_deleted_from_the_store_leave_the_cache(store, tmp_path):
    from fluxlora.common.models import resolve_model

    store.put_bytes("models/m/a.bin", b"a")
    store.put_bytes("models/m/old.bin", b"old")
    resolve_model("store://models/m/", store, tmp_path / "cache")
    store.delete("models/m/old.bin")
    local = resolve_model("store://models/m/", store, tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == ["a.bin"]


def test_processes_fetching_one_model_at_once_download_it_once(stored_model, downloads, tmp_path):
    """The ranks of a data-parallel run resolve the same model together: the second waits for the
    first's copy instead of swapping in its own under it (flock, so threads stand in for processes)."""
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        resolve_model("store://models/tiny", stored_model, tmp_path / "cache"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and (results[0] / "model_index.json").is_file()
    assert sorted(downloads) == sorted(f"models/tiny/{name}" for name in MODEL_FILES)  # each file once
