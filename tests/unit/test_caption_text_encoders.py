"""Caption length and trigger-word checks against FLUX's text encoders (CLIP 77, T5 512 tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxlora.captioning.model_tokenizers import counters_for
from fluxlora.captioning.text_encoders import (
    CLIP_LIMIT,
    T5_LIMIT,
    approximate_counters,
    flux_tokenizer_dirs,
    length_warnings,
    load_counters,
    over_length,
    trigger_warnings,
)
from fluxlora.models.tiny_tokenizers import build_clip_tokenizer, build_t5_tokenizer


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX-layout directory holding only the (tiny, word-level) tokenizers."""
    root = tmp_path_factory.mktemp("flux")
    build_clip_tokenizer().save_pretrained(root / "tokenizer")
    build_t5_tokenizer().save_pretrained(root / "tokenizer_2")
    return root


def words(n: int) -> str:
    return " ".join(["bottle"] * n)


def test_the_approximation_counts_words_punctuation_and_special_tokens() -> None:
    clip, t5 = approximate_counters()
    assert (clip.encoder, clip.limit, clip.exact) == ("CLIP", CLIP_LIMIT, False)
    assert (t5.encoder, t5.limit, t5.exact) == ("T5", T5_LIMIT, False)
    # words + comma + start/end tokens (CLIP) or end token (T5)
    assert clip.count("ohwx, a bottle on a table") == 7 + 2
    assert t5.count("ohwx, a bottle on a table") == 7 + 1
    # a long rare word is several pieces; a digit is one each
    assert clip.count("supercalifragilistic") == 2 + 4
    assert clip.count("1024") == 2 + 4


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        (words(10), []),
        (words(75), []),  # 75 + 2 = 77: exactly what CLIP reads
        (words(76), ["CLIP"]),
        (words(600), ["CLIP", "T5"]),
    ],
)
def test_a_caption_over_an_encoders_limit_gets_one_warning_per_encoder(caption: str, expected: list[str]) -> None:
    counters = approximate_counters()
    found = over_length({"img": caption}, counters)
    assert [c.encoder for c, _ in found.get("img", [])] == expected
    warnings = length_warnings({"img": caption}, counters)
    assert len(warnings) == len(expected)
    for warning, encoder in zip(warnings, expected, strict=True):
        assert "'img'" in warning and encoder in warning and "estimated" in warning


def test_length_warnings_name_each_long_caption() -> None:
    captions = {"short": words(5), "long-1": words(100), "long-2": words(90)}
    warnings = length_warnings(captions, approximate_counters())
    assert len(warnings) == 2
    assert "'long-1'" in warnings[0] and "about 102 CLIP tokens" in warnings[0]
    assert "'long-2'" in warnings[1]


def test_the_base_models_own_tokenizers_count_exactly(flux_dir: Path) -> None:
    counters, notes = load_counters(flux_tokenizer_dirs(flux_dir))
    assert notes == []
    clip, t5 = counters
    assert clip.exact and t5.exact
    caption = "ohwx, a bottle on a table"
    assert clip.count(caption) == len(build_clip_tokenizer()(caption)["input_ids"]) == 9
    assert t5.count(caption) == len(build_t5_tokenizer()(caption)["input_ids"]) == 8
    # no truncation: a long caption is counted whole
    assert clip.count(words(200)) == 202
    [warning] = length_warnings({"img": words(100)}, counters)
    assert "is 102 CLIP tokens" in warning and "estimated" not in warning


def test_a_missing_tokenizer_falls_back_to_the_approximation_and_says_so(tmp_path: Path) -> None:
    build_clip_tokenizer().save_pretrained(tmp_path / "tokenizer")
    counters, notes = load_counters(flux_tokenizer_dirs(tmp_path))
    assert [c.exact for c in counters] == [True, False]
    [note] = notes
    assert "T5" in note and "estimated" in note


@pytest.mark.parametrize(
    ("trigger", "with_tokenizers", "expected"),
    [
        # a rare made-up word: nothing to say
        ("fluxone", False, []),
        ("fluxone", True, []),
        ("ohwx", False, []),
        # an everyday word, with or without tokenizers
        ("dog", False, ["common English word"]),
        ("Bottle", False, ["common English word"]),
        ("dog", True, ["common English word", "single token that CLIP and T5 already know"]),
        # the tiny tokenizers hold "ohwx" as one word: a real CLIP splits it, these do not
        ("ohwx", True, ["single token that CLIP and T5 already know"]),
        # the DreamBooth classic, known without a tokenizer
        ("sks", False, ["single token CLIP already knows"]),
    ],
)
def test_trigger_warnings(trigger: str, with_tokenizers: bool, expected: list[str], flux_dir: Path) -> None:
    counters = load_counters(flux_tokenizer_dirs(flux_dir))[0] if with_tokenizers else approximate_counters()
    warnings = trigger_warnings(trigger, counters)
    assert len(warnings) == len(expected), warnings
    for warning, part in zip(warnings, expected, strict=True):
        assert part in warning and repr(trigger) in warning


def test_tokenizers_come_from_a_store_prefix_without_the_weights(store, flux_dir: Path, tmp_path: Path) -> None:
    store.upload_dir(flux_dir / "tokenizer", "models/flux-tok/tokenizer/")
    store.upload_dir(flux_dir / "tokenizer_2", "models/flux-tok/tokenizer_2/")
    store.put_bytes("models/flux-tok/transformer/diffusion_pytorch_model.safetensors", b"not fetched")
    counters, notes = counters_for("store://models/flux-tok", store, tmp_path / "cache")
    assert notes == [] and all(c.exact for c in counters)
    cached = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert cached == []
    assert counters_for("", store, tmp_path / "cache")[0][0].exact is False
