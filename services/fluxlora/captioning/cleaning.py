"""Caption cleaning: pure string functions, no models.

A LoRA learns its subject through the trigger word, so every training caption must hold it
exactly once; phrases naming the subject's class ("a woman") are usually removed so the trigger,
not the class word, absorbs what the subject looks like.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

POSITIONS = ("start", "end", "keep")

_TRIGGER_CHARS = re.compile(r"[\w-]+")
# A trigger is a token: "-" counts as part of a word so that "ohwx" is not found in "ohwx-style".
_TOKEN_BEFORE = r"(?<![\w-])"
_TOKEN_AFTER = r"(?![\w-])"
_POSSESSIVE = r"(?:['’]s(?!\w))?"
_ARTICLE = r"(?:(?<!\w)(?:a|an|the)\s+)?"

# Captioners start sentences with these; after a leading trigger they read better lowercased
# ("ohwx, a dog"), while names and acronyms keep their capitals.
_SOFT_STARTS = frozenset(
    [
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "it",
        "its",
        "in",
        "on",
        "at",
        "one",
        "two",
        "three",
        "four",
        "several",
        "some",
    ]
)


def validate_trigger(trigger: str) -> str:
    """The trigger, stripped; ValueError if it is empty or not a single word."""
    text = (trigger or "").strip()
    if not text:
        raise ValueError(
            "trigger word is empty: pass a short, rare word (for example 'ohwx') that the LoRA will "
            "learn to associate with the subject"
        )
    if any(ch.isspace() for ch in text):
        joined = "_".join(text.split())
        raise ValueError(
            f"trigger word {text!r} has spaces: it must be a single word, such as {joined!r}"
        )
    if not _TRIGGER_CHARS.fullmatch(text) or not re.search(r"[^\W_]", text):
        raise ValueError(
            f"trigger word {text!r} must be one word of letters and digits (may also use '_' and '-'), "
            "without punctuation"
        )
    return text


def apply_trigger(caption: str, trigger: str, position: str = "start") -> str:
    """The caption with the trigger exactly once.

    Occurrences are found case-insensitively and only as whole tokens. "start" and "end" remove
    them all and put the trigger first ("ohwx, a bottle on a table") or last; "keep" keeps the
    first occurrence where it is (in the trigger's own spelling), removes the rest, and puts the
    trigger first when the caption has none.
    """
    trigger = validate_trigger(trigger)
    if position not in POSITIONS:
        raise ValueError(
            f"unknown trigger position {position!r}; use one of {', '.join(POSITIONS)}"
        )
    pattern = _trigger_pattern(trigger, possessive=True)
    text = caption or ""
    if position == "keep":
        # The kept occurrence keeps its possessive ("ohwx's hat"); the removed ones take theirs along.
        first = _trigger_pattern(trigger).search(text)
        if first is not None:
            head = text[: first.start()]
            tail = pattern.sub(" ", text[first.end() :])
            return normalize(f"{head}{trigger}{tail}")
    rest = normalize(pattern.sub(" ", text))
    if not rest:
        return trigger
    if position == "end":
        return f"{rest.rstrip('.!?…').rstrip()}, {trigger}"
    return f"{trigger}, {_soften_start(rest)}"


def remove_phrases(caption: str, phrases: Iterable[str]) -> str:
    """The caption without the given phrases, matched case-insensitively as whole words.

    A phrase also removes its simple plurals (s, es, y -> ies), a possessive 's and a leading
    article ("a woman" goes with "woman"). Longer phrases go first, so "red car" is removed whole
    before "car" is looked for.
    """
    wanted = sorted(
        {" ".join(p.split()) for p in phrases if p and p.strip()}, key=len, reverse=True
    )
    text = caption or ""
    for phrase in wanted:
        text = _phrase_pattern(phrase).sub(" ", text)
    return normalize(text)


def normalize(caption: str) -> str:
    """Tidy whitespace and punctuation without changing the words.

    Collapses whitespace (newlines included), drops spaces before punctuation, duplicate commas
    and punctuation left dangling at either end (a final . ! or ? stays).
    """
    text = " ".join((caption or "").split())
    text = re.sub(r"\(\s*\)|\[\s*\]", " ", text)
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[])\s+", r"\1", text)
    text = re.sub(r"[,;:](?:\s*[,;:])+", lambda m: m.group(0)[0], text)
    text = re.sub(r"[,;:]+(?=[.!?])", "", text)
    text = re.sub(r"([.!?])\s*[,;:]+", r"\1", text)
    text = re.sub(r"(?<!\.)\.\.(?!\.)", ".", text)
    text = re.sub(r"([,;:])(?=[^\W\d_])", r"\1 ", text)
    text = re.sub(r"^[\s,.;:!?\-–—…]+", "", text)
    text = re.sub(r"[\s,;:\-–—]+$", "", text)
    return text


def clean_caption(
    caption: str,
    trigger: str,
    remove: Iterable[str] = (),
    position: str = "start",
) -> str:
    """remove_phrases, then normalize, then apply_trigger: the caption as it is trained on."""
    trigger = validate_trigger(trigger)
    if position not in POSITIONS:
        raise ValueError(
            f"unknown trigger position {position!r}; use one of {', '.join(POSITIONS)}"
        )
    return apply_trigger(normalize(remove_phrases(caption, remove)), trigger, position)


def count_trigger(caption: str, trigger: str) -> int:
    """How many times the trigger occurs as a token (case-insensitive)."""
    return len(_trigger_pattern(validate_trigger(trigger)).findall(caption or ""))


def _trigger_pattern(trigger: str, possessive: bool = False) -> re.Pattern[str]:
    suffix = _POSSESSIVE if possessive else ""
    return re.compile(_TOKEN_BEFORE + re.escape(trigger) + _TOKEN_AFTER + suffix, re.IGNORECASE)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in phrase.split()]
    last = phrase.split()[-1]
    if re.search(r"[^aeiou\W]y$", last, re.IGNORECASE):
        words[-1] = re.escape(last[:-1]) + r"(?:y|ies)"
    elif re.search(r"\w$", last):
        words[-1] += r"(?:e?s)?"
    body = r"\s+".join(words)
    article = "" if re.match(r"(?:a|an|the)\s", phrase, re.IGNORECASE) else _ARTICLE
    start = r"(?<!\w)" if re.match(r"\w", phrase) else ""
    end = r"(?!\w)" if re.search(r"\w$", phrase) else ""
    return re.compile(article + start + body + end + _POSSESSIVE, re.IGNORECASE)


def _soften_start(text: str) -> str:
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and first[1:] == first[1:].lower() and first.lower() in _SOFT_STARTS:
        return first.lower() + text[len(first) :]
    return text
