"""Captions and trigger words checked against FLUX's text encoders: CLIP reads 77 tokens, T5 512.

Exact counts need the base model's own tokenizers (its tokenizer/ and tokenizer_2/ folders), which
`load_counters` reads when a base model is given. Without one, `approximate_counters` estimate:

- CLIP (byte-pair encoding): every run of letters counts 1 token when it is a common word or at
  most 8 letters long, else one per 6 letters; every digit and every run of punctuation counts 1;
  plus start and end tokens.
- T5 (sentencepiece): the same with common words or at most 7 letters as 1 token, else one per 5
  letters; plus the end token.

On English captions the estimate lands within a few tokens of the real count, erring long for
rare long words; the warnings say when a count is approximate.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fluxlora.captioning.common_words import COMMON_WORDS, WELL_KNOWN_TOKENS

CLIP_LIMIT = 77
T5_LIMIT = 512
# FLUX's diffusers layout: CLIP's tokenizer in tokenizer/, T5's in tokenizer_2/.
TOKENIZER_FOLDERS = {"CLIP": ("tokenizer", CLIP_LIMIT), "T5": ("tokenizer_2", T5_LIMIT)}

_PIECES = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_+")


@dataclass(frozen=True)
class TokenCounter:
    encoder: str  # "CLIP" or "T5"
    limit: int
    exact: bool
    count: Callable[[str], int]
    # Whether a single word is one token the encoder already has a meaning for; None when unknown.
    knows_word: Callable[[str], bool] | None = None


def approximate_counters() -> list[TokenCounter]:
    return [
        TokenCounter("CLIP", CLIP_LIMIT, False, lambda text: _estimate(text, short=8, per=6, specials=2)),
        TokenCounter("T5", T5_LIMIT, False, lambda text: _estimate(text, short=7, per=5, specials=1)),
    ]


def flux_tokenizer_dirs(base_model_dir: Path) -> dict[str, Path]:
    """{encoder: tokenizer directory} in a diffusers-layout FLUX model."""
    return {encoder: Path(base_model_dir) / folder for encoder, (folder, _) in TOKENIZER_FOLDERS.items()}


def load_counters(tokenizer_dirs: Mapping[str, Path] | None) -> tuple[list[TokenCounter], list[str]]:
    """Exact counters from tokenizer directories ({"CLIP": dir, "T5": dir}), falling back to the
    approximation per encoder whose tokenizer is missing or unreadable; the notes say which and why."""
    approximate = {c.encoder: c for c in approximate_counters()}
    if not tokenizer_dirs:
        return list(approximate.values()), []
    counters, notes = [], []
    for encoder, (folder, limit) in TOKENIZER_FOLDERS.items():
        path = tokenizer_dirs.get(encoder)
        if path is None:
            counters.append(approximate[encoder])
            notes.append(f"{encoder} tokens are estimated: the base model has no {folder}/")
            continue
        try:
            counters.append(tokenizer_counter(path, encoder, limit))
        except (OSError, ValueError, TypeError) as exc:
            counters.append(approximate[encoder])
            notes.append(f"{encoder} tokens are estimated: no usable tokenizer in {str(path)!r} ({exc})")
    return counters, notes


def tokenizer_counter(path: Path, encoder: str, limit: int) -> TokenCounter:
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    unknown = tokenizer.unk_token

    def count(text: str) -> int:
        # Long captions are what this is for: transformers' "sequence too long" log is noise here.
        previous = logging.getLogger("transformers.tokenization_utils_base").level
        logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
        try:
            return len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])
        finally:
            logging.getLogger("transformers.tokenization_utils_base").setLevel(previous)

    def knows_word(word: str) -> bool:
        pieces = [p for p in tokenizer.tokenize(word) if p not in ("▁", "")]
        return len(pieces) == 1 and pieces[0] != unknown

    return TokenCounter(encoder, limit, True, count, knows_word)


def over_length(
    captions: Mapping[str, str], counters: Iterable[TokenCounter]
) -> dict[str, list[tuple[TokenCounter, int]]]:
    """{stem: [(counter, token count), ...]} for the captions longer than an encoder reads."""
    counters = list(counters)
    found: dict[str, list[tuple[TokenCounter, int]]] = {}
    for stem, caption in captions.items():
        for counter in counters:
            n = counter.count(caption)
            if n > counter.limit:
                found.setdefault(stem, []).append((counter, n))
    return found


def length_warnings(captions: Mapping[str, str], counters: Iterable[TokenCounter]) -> list[str]:
    """One warning per caption and encoder whose token count is over the encoder's limit."""
    warnings = []
    for stem, overs in over_length(captions, counters).items():
        for counter, n in overs:
            about = "" if counter.exact else "about "
            warnings.append(
                f"caption {stem!r} is {about}{n} {counter.encoder} tokens, over the {counter.limit} the "
                f"{counter.encoder} text encoder reads: the end is cut off in training; shorten it"
                + ("" if counter.exact else " (estimated count: give a base model for an exact one)")
            )
    return warnings


def trigger_warnings(trigger: str, counters: Iterable[TokenCounter] = ()) -> list[str]:
    """Why a trigger word may be a poor choice: it is a common word, or a token the encoders know."""
    word = trigger.strip()
    warnings = []
    if word.lower() in COMMON_WORDS:
        warnings.append(
            f"trigger word {word!r} is a common English word: the text encoders already know what it means, "
            "and the LoRA has to fight that meaning; use a rare made-up word such as 'ohwx'"
        )
    known = [c.encoder for c in counters if c.knows_word is not None and c.knows_word(word)]
    if known:
        warnings.append(
            f"trigger word {word!r} is a single token that {' and '.join(known)} already know"
            f"{'s' if len(known) == 1 else ''}: it carries a meaning into training; a word the tokenizers "
            "split into pieces (such as 'ohwx') starts out empty"
        )
    elif word.lower() in WELL_KNOWN_TOKENS and not any(c.exact for c in counters):
        warnings.append(
            f"trigger word {word!r} is a single token CLIP already knows (a known DreamBooth pitfall): "
            "it carries a meaning into training; use a word such as 'ohwx'"
        )
    return warnings


def _estimate(text: str, short: int, per: int, specials: int) -> int:
    total = specials
    for piece in _PIECES.findall(text or ""):
        if piece[0].isalpha() and len(piece) > short and piece.lower() not in COMMON_WORDS:
            total += math.ceil(len(piece) / per)
        else:
            total += 1
    return total
