"""Edit instructions for before/after pairs (FLUX.1 Kontext), written from a description of each half.

An editing LoRA learns (before image, caption) -> after image, so its caption is the edit, not a
description of the result. What the trainers and the model's makers document:

- ai-toolkit (config/examples/train_lora_flux_kontext_24gb.yaml): the captions are the .txt files of
  the after images (`folder_path`); the control (before) images "do not need captions"; its sample
  prompts are short imperative edits: "make the person smile", "give the person an afro", "turn this
  image into a cartoon".
- SimpleTuner (documentation/quickstart/FLUX_KONTEXT.md): the edit images carry the caption text
  files; each reference image is paired with its edit by file name and needs none of its own.
- musubi-tuner (docs/flux_kontext.md): the dataset's `control_images` are the reference; the caption
  is the prompt, as at inference (`--prompt` with `--control_image_path`).
- Black Forest Labs' Kontext prompting guide: name only what changes ("Change the car to red");
  what the prompt does not mention is kept.

So an instruction here is one short imperative clause per difference, lower case, without the
parts both descriptions share. The difference is a word-level diff (difflib) of the two
descriptions: added words give "add a red hat", removed ones "remove glasses", replaced ones
"change red to blue", a new medium in front ("a painting of ...") "turn it into a painting"; when
the descriptions share little (or differ in more than MAX_CLAUSES places), "make it <the after
description>". A pair described identically gets that too, marked SAME so the job can ask for a
hand-written instruction. The captioner's words are kept: this writes the form, a person checks the content.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fluxlora.captioning.cleaning import apply_trigger, normalize, remove_phrases_counted, soften_start
from fluxlora.captioning.defaults import DEFAULTS

# What an instruction says (Instruction.kind).
ADD, REMOVE, CHANGE, RESTYLE, DESCRIBE, SAME = "add", "remove", "change", "restyle", "describe", "same"
# More differences than this and the word diff is no longer an edit: the after description is used.
MAX_CLAUSES = 3
# Below this share of words in common (difflib's ratio) the two are different pictures, not an edit.
MIN_SHARED = 0.5

_ARTICLES = frozenset(["a", "an", "the"])
# Words that tie an added or removed part to the rest of a description ("a man with glasses"):
# the instruction names the thing itself ("remove glasses").
_LINKS = frozenset(["and", "with", "wearing", "has", "having", "holding", "carrying", "who", "is", "are"])
# An added part starting with one of these places the subject somewhere: "put it on a beach".
_PLACES = frozenset(["in", "on", "at", "under", "behind", "near", "inside", "beside", "by", "over", "above",
                     "below", "against", "outside", "underneath", "among", "between", "into", "onto"])
_FILLERS = frozenset(_ARTICLES | {"of", "and", "with", "in", "on", "at", "to", "is", "are"})
_NOT_MEDIUM = _FILLERS - {"and"}  # "black and white photo" is one
_EDGE_PUNCTUATION = "\"'.,;:!?()[]{}…"


@dataclass(frozen=True)
class Instruction:
    text: str
    # ADD, REMOVE, CHANGE or RESTYLE (several clauses: the first one's); DESCRIBE; SAME when the two
    # descriptions are alike or the after one is empty: the captioner did not see the edit.
    kind: str


@dataclass(frozen=True)
class InstructionCaptions:
    captions: dict[str, str]  # stem -> the instruction with the trigger, as trained on
    kinds: dict[str, str]  # stem -> Instruction.kind
    # phrase -> how many pairs it changed (in either description); 0 included, as clean_captions does
    phrase_counts: dict[str, int]


def write_instruction(before: str, after: str) -> Instruction:
    """The edit that turns what `before` describes into what `after` describes."""
    old, new = _words(before), _words(after)
    described = _describe(after)
    if not new or [w.lower() for w in old] == [w.lower() for w in new]:
        return Instruction(described, SAME)
    matcher = _matcher(old, new)
    if not old or matcher.ratio() < MIN_SHARED or not _shares_content(matcher, new):
        return Instruction(described, DESCRIBE)
    clauses = _clauses(old, new)
    # Lists: "a sofa and a lamp" -> "a sofa, a lamp and a plant" aligns "and" across items; without
    # it the diff finds the one added item.
    unlisted = _clauses(*[[w for w in words if w.lower() != "and"] for words in (old, new)])
    if unlisted is not None and (clauses is None or len(unlisted) < len(clauses)):
        clauses = unlisted
    if clauses is None or len(clauses) > MAX_CLAUSES:
        return Instruction(described, DESCRIBE)
    texts = [text for text, _ in clauses]
    joined = texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]
    return Instruction(joined, clauses[0][1])


def instruction_captions(
    before: Mapping[str, str],
    after: Mapping[str, str],
    trigger: str,
    remove: Iterable[str] = (),
    position: str = DEFAULTS.trigger_position,
) -> InstructionCaptions:
    """An instruction per stem of `after` from its two descriptions, with the remove phrases taken
    out of both first (so the instruction never names them) and the trigger placed as apply_trigger
    places it in any caption ("ohwx, add a red hat")."""
    phrases = list(dict.fromkeys(p.strip() for p in remove if p and p.strip()))
    counts = dict.fromkeys(phrases, 0)
    captions, kinds = {}, {}
    for stem, after_text in after.items():
        old, matched_old = remove_phrases_counted(before.get(stem, ""), phrases)
        new, matched_new = remove_phrases_counted(after_text, phrases)
        for phrase in dict.fromkeys(matched_old + matched_new):
            counts[phrase] += 1
        instruction = write_instruction(old, new)
        captions[stem] = apply_trigger(instruction.text, trigger, position)
        kinds[stem] = instruction.kind
    return InstructionCaptions(captions, kinds, counts)


def _matcher(old: list[str], new: list[str]) -> difflib.SequenceMatcher:
    return difflib.SequenceMatcher(None, [w.lower() for w in old], [w.lower() for w in new], autojunk=False)


def _clauses(old: list[str], new: list[str]) -> list[tuple[str, str]] | None:
    """A clause per difference; None when one of them makes no readable clause."""
    clauses = []
    for tag, i1, i2, j1, j2 in _matcher(old, new).get_opcodes():
        if tag == "equal":
            continue
        clause = _clause(old[i1:i2], new, j1, j2)
        if clause is None:
            return None
        clauses.append(clause)
    return clauses


def _clause(old: list[str], new: list[str], j1: int, j2: int) -> tuple[str, str] | None:
    """One difference as (clause, kind); None when it makes no readable clause."""
    added = new[j1:j2]
    if added and all(w.lower() in _ARTICLES for w in new[:j1]):  # at the start: what the picture is
        medium = _medium(new, j1, j2)
        if medium:
            return f"turn it into {_article(medium[0])} {' '.join(medium)}", RESTYLE
    if not old:
        core = _strip(added, _LINKS | _ARTICLES, leading_only=True)
        if not core or all(w.lower() in _FILLERS for w in core):
            return None
        if core[0].lower() in _PLACES:
            return f"put it {' '.join(core)}", ADD
        if (len(core) == 1 and 0 < j1 and new[j1 - 1].lower() in _ARTICLES and j2 < len(new)
                and new[j2].lower() not in _FILLERS):
            return f"make the {new[j2]} {core[0]}", ADD  # a car -> a red car: "make the car red"
        return f"add {' '.join(_with_article(added, core))}", ADD
    if not added:
        core = _strip(old, _LINKS, leading_only=True)
        if not core or all(w.lower() in _FILLERS for w in core):
            return None
        return f"remove {' '.join(core)}", REMOVE
    was, becomes = _strip(old, _ARTICLES), _strip(added, _ARTICLES)
    if not was or not becomes:
        return None
    return f"change {' '.join(was)} to {' '.join(becomes)}", CHANGE


def _medium(new: list[str], j1: int, j2: int) -> list[str]:
    """The new medium of a description that starts with one ("a painting of ...", "a black and white
    photo of ..."): the words from the change up to "of" when it comes at most two words after the
    change; [] when the change is not that."""
    lowered = [w.lower() for w in new]
    ends = [i for i in range(j1, min(j2 + 3, len(new)))
            if lowered[i] == "of" and all(w in _ARTICLES for w in lowered[i + 1:j2])]
    if not ends:
        return []
    words = _strip(new[j1:ends[0]], _ARTICLES)
    return words if words and not any(w.lower() in _NOT_MEDIUM for w in words) else []


def _shares_content(matcher: difflib.SequenceMatcher, new: list[str]) -> bool:
    # Two descriptions that share only "a", "of" and "the" are of different things.
    return any(w.lower() not in _FILLERS for _, j, n in matcher.get_matching_blocks() for w in new[j:j + n])


def _with_article(added: list[str], core: list[str]) -> list[str]:
    """The added words without their link words, keeping an article that came with them."""
    start = len(added) - len(core)
    if start > 0 and added[start - 1].lower() in _ARTICLES:
        return [added[start - 1], *core]
    return core


def _strip(words: list[str], drop: Iterable[str], leading_only: bool = False) -> list[str]:
    drop = frozenset(drop)
    start, end = 0, len(words)
    while start < end and words[start].lower() in drop:
        start += 1
    while not leading_only and end > start and words[end - 1].lower() in drop:
        end -= 1
    return words[start:end]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _words(text: str) -> list[str]:
    words = [w.strip(_EDGE_PUNCTUATION) for w in re.split(r"[\s,;]+", text or "")]
    words = [w for w in words if w]
    return [soften_start(words[0]), *words[1:]] if words else []


def _describe(after: str) -> str:
    text = normalize(after).rstrip(".!?…").rstrip()
    return f"make it {soften_start(text)}" if text else ""
