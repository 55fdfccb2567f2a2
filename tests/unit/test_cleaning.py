"""Caption cleaning, as a table of spec cases."""

from __future__ import annotations

import pytest

from fluxlora.captioning.cleaning import (
    apply_tags,
    apply_trigger,
    clean_caption,
    clean_captions,
    count_trigger,
    normalize,
    remove_phrases,
    remove_phrases_counted,
    validate_trigger,
)


@pytest.mark.parametrize(
    ("caption", "position", "expected"),
    [
        # at the start by default, separated by a comma
        ("a bottle on a table", "start", "ohwx, a bottle on a table"),
        # a captioner's capitalised article reads lowercase after the trigger; names keep capitals
        ("A bottle on a table.", "start", "ohwx, a bottle on a table."),
        ("Paris at night", "start", "ohwx, Paris at night"),
        # at the end, after the sentence's own full stop is dropped
        ("A bottle on a table.", "end", "A bottle on a table, ohwx"),
        # a caption that already holds the trigger twice ends with it once
        ("ohwx standing by ohwx", "start", "ohwx, standing by"),
        ("a photo of ohwx, ohwx smiling", "start", "ohwx, a photo of, smiling"),
        # found whatever its case, written in the trigger's own spelling
        ("a photo of OHWX and Ohwx", "start", "ohwx, a photo of and"),
        # whole tokens only: neither ohwxy nor ohwx-style is the trigger
        ("a photo of ohwxy in ohwx-style", "start", "ohwx, a photo of ohwxy in ohwx-style"),
        # "keep" leaves the first occurrence where it is and drops the others
        ("a photo of ohwx, OHWX smiling", "keep", "a photo of ohwx, smiling"),
        ("a photo of OHWX smiling", "keep", "a photo of ohwx smiling"),
        ("a photo of ohwx's hat, ohwx", "keep", "a photo of ohwx's hat"),
        # ... and adds it at the start when there is none
        ("a dog on a sofa", "keep", "ohwx, a dog on a sofa"),
        # an empty caption becomes the trigger alone
        ("", "start", "ohwx"),
        ("  ,  ", "end", "ohwx"),
    ],
)
def test_trigger_appears_exactly_once(caption: str, position: str, expected: str) -> None:
    result = apply_trigger(caption, "ohwx", position)
    assert result == expected
    assert count_trigger(result, "ohwx") == 1


@pytest.mark.parametrize(
    ("caption", "phrases", "expected"),
    [
        ("a woman sitting on a bench", ["woman"], "sitting on a bench"),
        # case-insensitive
        ("A Woman sitting on a bench", ["woman"], "sitting on a bench"),
        # plural variants: s, es, y -> ies
        ("two dogs and a dog", ["dog"], "two and"),
        ("glasses on a glass table", ["glass"], "on table"),
        ("a baby with babies", ["baby"], "with"),
        # whole words only: "cat" is not in "category" or "concatenate"
        ("a category of cats", ["cat"], "a category of"),
        # multi-word phrases, with any spacing, and the longer phrase first
        ("The image shows a red  car, a car", ["car", "the image shows", "red car"], ""),
        ("The image shows a dog", ["the image shows"], "a dog"),
        # left-over commas and spaces are tidied
        ("a man, woman, and a dog", ["woman"], "a man, and a dog"),
        # a possessive goes with its noun
        ("the woman's hat", ["woman"], "hat"),
        # no phrases, or blank ones, only normalise
        ("a  dog ,", [], "a dog"),
        ("a dog", ["", "  "], "a dog"),
    ],
)
def test_remove_phrases(caption: str, phrases: list[str], expected: str) -> None:
    assert remove_phrases(caption, phrases) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("  a   dog\non a\ttable  ", "a dog on a table"),
        ("a dog , on a table .", "a dog, on a table."),
        ("a dog,, , on a table", "a dog, on a table"),
        ("a dog,.", "a dog."),
        (", ; a dog -", "a dog"),
        ("... a dog", "a dog"),
        ("a dog..", "a dog."),
        ("it waits...", "it waits..."),
        ("a dog,on a table", "a dog, on a table"),
        ("1,000 birds at 12:30", "1,000 birds at 12:30"),
        ("a dog ( ) on a table", "a dog on a table"),
        ("", ""),
    ],
)
def test_normalize(caption: str, expected: str) -> None:
    assert normalize(caption) == expected


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ("", "trigger word is empty"),
        ("   ", "trigger word is empty"),
        ("oh wx", "has spaces"),
        ("ohwx!", "letters and digits"),
        ("a.b", "letters and digits"),
        ("__", "letters and digits"),
        ("x" * 1_000_000, "1000000 characters, over the limit of 64"),  # found by the chaos run
    ],
)
def test_bad_triggers_are_rejected_with_a_clear_message(trigger: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_trigger(trigger)
    with pytest.raises(ValueError, match=message):
        clean_caption("a dog", trigger)


@pytest.mark.parametrize("trigger", ["ohwx", " sks ", "zwx_2", "my-subject", "Ωmega"])
def test_good_triggers_are_stripped(trigger: str) -> None:
    assert validate_trigger(trigger) == trigger.strip()


def test_unknown_position_is_rejected() -> None:
    with pytest.raises(ValueError, match="start, end, keep"):
        apply_trigger("a dog", "ohwx", "middle")


@pytest.mark.parametrize(
    ("caption", "remove", "position", "expected"),
    [
        (
            "The image shows a woman, woman sitting at a table with OHWX.",
            ["the image shows", "woman"],
            "start",
            "ohwx, sitting at a table with.",
        ),
        ("A woman in a red dress", ["woman"], "end", "in a red dress, ohwx"),
        ("A photo of ohwx woman smiling, ohwx", ["woman"], "keep", "A photo of ohwx smiling"),
        ("  ", (), "start", "ohwx"),
    ],
)
def test_clean_caption_removes_then_normalises_then_adds_the_trigger(
    caption: str, remove: list[str], position: str, expected: str
) -> None:
    result = clean_caption(caption, "ohwx", remove, position)
    assert result == expected
    assert count_trigger(result, "ohwx") == 1


@pytest.mark.parametrize(
    ("caption", "position", "expected"),
    [
        # sentences become one tag each, the trigger its own tag first, no trailing full stop
        ("A bottle on a table.", "start", "ohwx, A bottle on a table"),
        ("red bottle, table, wooden floor", "start", "ohwx, red bottle, table, wooden floor"),
        # duplicates go (ignoring case, first spelling kept), as do empty tags
        ("bottle, Bottle, , table,, bottle", "start", "ohwx, bottle, table"),
        # semicolons and line breaks separate tags too
        ("bottle; table\nfloor", "start", "ohwx, bottle, table, floor"),
        # a trigger anywhere leaves its tag; the trigger appears once, first
        ("bottle, ohwx, table, OHWX", "start", "ohwx, bottle, table"),
        ("photo of ohwx, table", "start", "ohwx, photo of, table"),
        # at the end, or kept where it first was
        ("bottle, table", "end", "bottle, table, ohwx"),
        ("bottle, ohwx, table, ohwx", "keep", "bottle, ohwx, table"),
        ("bottle, table", "keep", "ohwx, bottle, table"),
        # nothing left but the trigger
        ("", "start", "ohwx"),
        ("ohwx, ohwx", "start", "ohwx"),
    ],
)
def test_tag_style_is_comma_separated_deduplicated_with_the_trigger_once(
    caption: str, position: str, expected: str
) -> None:
    result = apply_tags(caption, "ohwx", position)
    assert result == expected
    assert count_trigger(result, "ohwx") == 1


def test_clean_caption_in_tag_style_removes_phrases_per_tag() -> None:
    result = clean_caption("A woman, red dress, woman smiling, Red Dress", "ohwx", ["woman"], style="tags")
    assert result == "ohwx, red dress, smiling"


def test_unknown_style_is_rejected() -> None:
    with pytest.raises(ValueError, match="natural, tags"):
        clean_caption("a dog", "ohwx", style="prose")


@pytest.mark.parametrize(
    ("caption", "phrases", "expected_text", "expected_matched"),
    [
        ("a woman with a dog", ["woman", "cat"], "with a dog", ["woman"]),
        # the longer phrase takes its words first, so "car" has nothing left to remove
        ("a red car", ["car", "red car"], "", ["red car"]),
        ("two cars and a car", ["car"], "two and", ["car"]),
        # phrases are reported as the user gave them (stripped)
        ("a woman", ["  Woman "], "", ["Woman"]),
        ("a dog", [], "a dog", []),
    ],
)
def test_remove_phrases_reports_which_phrases_matched(
    caption: str, phrases: list[str], expected_text: str, expected_matched: list[str]
) -> None:
    assert remove_phrases_counted(caption, phrases) == (expected_text, expected_matched)


def test_clean_captions_counts_how_many_captions_each_phrase_changed() -> None:
    raw = {
        "a": "a woman with a bottle",
        "b": "a bottle on a table, bottles behind",
        "c": "a dog",
    }
    cleaned = clean_captions(raw, "ohwx", ["bottle", "woman", "zebra"])
    # a phrase counts once per caption it changed, however often it occurs there; unused phrases show 0
    assert cleaned.phrase_counts == {"bottle": 2, "woman": 1, "zebra": 0}
    assert cleaned.captions == {
        "a": "ohwx, with",
        "b": "ohwx, on a table, behind",
        "c": "ohwx, a dog",
    }
    assert list(cleaned.captions) == ["a", "b", "c"]
