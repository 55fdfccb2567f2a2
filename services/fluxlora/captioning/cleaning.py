"""Caption cleaning: pure string functions, no models.

A LoRA learns its subject through the trigger word, so every training caption must hold it
exactly once; phrases naming the subject's class ("a woman") are usually removed so the trigger,
not the class word, absorbs what the subject looks like.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fluxlora.captioning.defaults import DEFAULTS

POSITIONS = ("start", "end", "keep")
# "natural": sentences as the captioner writes them. "tags": comma-separated tags (booru style),
# deduplicated, which some trainers and base models prefer.
STYLES = ("natural", "tags")

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


MAX_TRIGGER_CHARS = 64  # a trigger is one rare word of a few tokens; anything longer is a mistake


def validate_trigger(trigger: str) -> str:
    """The trigger, stripped; ValueError if it is empty, longer than MAX_TRIGGER_CHARS or not a
    single word."""
    text = (trigger or "").strip()
    if len(text) > MAX_TRIGGER_CHARS:
        raise ValueError(
            f"trigger word is {len(text)} characters, over the limit of {MAX_TRIGGER_CHARS}: use a short, "
            "rare word (for example 'ohwx')"
        )
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


def apply_trigger(caption: str, trigger: str, position: str = DEFAULTS.trigger_position) -> str:
    """The caption with the trigger exactly once.

    Occurrences are found case-insensitively and only as whole tokens. "start" and "end" remove
    them all and put the trigger first ("ohwx, a bottle on a table") or last; "keep" keeps the
    first occurrence where it is (in the trigger's own spelling), removes the rest, and puts the
    trigger first when the caption has none.
    """
    trigger = validate_trigger(trigger)
    check_position(position)
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
    return f"{trigger}, {soften_start(rest)}"


def remove_phrases(caption: str, phrases: Iterable[str]) -> str:
    """The caption without the given phrases, matched case-insensitively as whole words.

    A phrase also removes its simple plurals (s, es, y -> ies), a possessive 's and a leading
    article ("a woman" goes with "woman"). Longer phrases go first, so "red car" is removed whole
    before "car" is looked for.
    """
    return remove_phrases_counted(caption, phrases)[0]


def remove_phrases_counted(caption: str, phrases: Iterable[str]) -> tuple[str, list[str]]:
    """remove_phrases, and which of the phrases (as given, stripped) removed something."""
    wanted: dict[str, str] = {}
    for phrase in phrases:
        if phrase and phrase.strip():
            wanted.setdefault(" ".join(phrase.split()), phrase.strip())
    text = caption or ""
    matched = []
    for phrase in sorted(wanted, key=len, reverse=True):
        text, count = _phrase_pattern(phrase).subn(" ", text)
        if count:
            matched.append(wanted[phrase])
    return normalize(text), matched


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
    position: str = DEFAULTS.trigger_position,
    style: str = DEFAULTS.style,
) -> str:
    """remove_phrases, then normalize, then apply_trigger (or apply_tags): the caption as it is trained on."""
    trigger = validate_trigger(trigger)
    check_position(position)
    check_style(style)
    text = normalize(remove_phrases(caption, remove))
    if style == "tags":
        return apply_tags(text, trigger, position)
    return apply_trigger(text, trigger, position)


def apply_tags(caption: str, trigger: str, position: str = DEFAULTS.trigger_position) -> str:
    """The caption as comma-separated tags with the trigger exactly once.

    Tags are split on commas, semicolons and line breaks, tidied (no trailing full stop), and
    deduplicated ignoring case, the first spelling kept. The trigger becomes a tag of its own: the
    first ("start", the default) or last ("end"); "keep" leaves it where its first occurrence was.
    """
    trigger = validate_trigger(trigger)
    check_position(position)
    pattern = _trigger_pattern(trigger, possessive=True)
    tags: list[str] = []
    seen: set[str] = set()
    keep_at = None
    for raw in re.split(r"[,;\n]", caption or ""):
        if keep_at is None and pattern.search(raw):
            keep_at = len(tags)
        tag = normalize(pattern.sub(" ", raw)).rstrip(".!?…").strip()
        if tag and tag.lower() not in seen:
            seen.add(tag.lower())
            tags.append(tag)
    if position == "end":
        tags.append(trigger)
    elif position == "keep" and keep_at is not None:
        tags.insert(keep_at, trigger)
    else:
        tags.insert(0, trigger)
    return ", ".join(tags)


def check_position(position: str) -> str:
    if position not in POSITIONS:
        raise ValueError(
            f"unknown trigger position {position!r}; use one of {', '.join(POSITIONS)}"
        )
    return position


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown caption style {style!r}; use one of {', '.join(STYLES)}")
    return style


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


def soften_start(text: str) -> str:
    """The text with a capitalised sentence start such as "A" or "The" lowercased, names kept."""
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and first[1:] == first[1:].lower() and first.lower() in _SOFT_STARTS:
        return first.lower() + text[len(first) :]
    return text


@dataclass(frozen=True)
class CleanedCaptions:
    captions: dict[str, str]
    # phrase -> how many captions it changed; every phrase asked for is present, 0 included, so a
    # phrase the captioner never wrote (a typo, the wrong word) stands out.
    phrase_counts: dict[str, int]


def clean_captions(
    raw: Mapping[str, str],
    trigger: str,
    remove: Iterable[str] = (),
    position: str = DEFAULTS.trigger_position,
    style: str = DEFAULTS.style,
) -> CleanedCaptions:
    """clean_caption for every caption of a set, counting what each remove phrase changed."""
    trigger = validate_trigger(trigger)
    check_position(position)
    check_style(style)
    phrases = list(dict.fromkeys(p.strip() for p in remove if p and p.strip()))
    counts = dict.fromkeys(phrases, 0)
    captions = {}
    for stem, text in raw.items():
        removed, matched = remove_phrases_counted(text, phrases)
        for phrase in matched:
            counts[phrase] += 1
        removed = normalize(removed)
        captions[stem] = apply_tags(removed, trigger, position) if style == "tags" else apply_trigger(
            removed, trigger, position
        )
    return CleanedCaptions(captions, counts)
