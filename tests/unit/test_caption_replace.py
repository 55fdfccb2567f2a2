"""Bulk find/replace over captions, as a table of cases."""

from __future__ import annotations

import pytest

from fluxlora.captioning.replace import compile_find, replace_in


@pytest.mark.parametrize(
    ("captions", "find", "replacement", "options", "expected"),
    [
        # whole words, any case, by default
        (
            {"a": "a cat in a category", "b": "Cat food"}, "cat", "dog", {},
            {"a": "a dog in a category", "b": "dog food"},
        ),
        # substring matches inside words too
        ({"a": "a cat in a category"}, "cat", "dog", {"substring": True}, {"a": "a dog in a dogegory"}),
        # case-sensitive leaves other spellings alone
        ({"a": "Cat and cat"}, "cat", "dog", {"case_sensitive": True}, {"a": "Cat and dog"}),
        # multi-word literal text; regex characters in it are literal
        ({"a": "a red car (new)", "b": "scared cars"}, "red car (new)", "car", {}, {"a": "a car"}),
        # deleting a word leaves no double space or stray comma behind
        ({"a": "ohwx, a plastic bottle, plastic"}, "plastic", "", {}, {"a": "ohwx, a bottle"}),
        # punctuation as the needle: no word boundary is forced on it
        ({"a": "ohwx; a bottle; a table"}, ";", ",", {}, {"a": "ohwx, a bottle, a table"}),
        # regex with groups
        ({"a": "a 3 year old dog"}, r"(\d+) year old", r"\1-year-old", {"regex": True}, {"a": "a 3-year-old dog"}),
        # a regex is still whole-word unless substring
        ({"a": "bottles and bottle"}, r"bottle", "jar", {"regex": True}, {"a": "bottles and jar"}),
        ({"a": "bottles and bottle"}, r"bottles?", "jar", {"regex": True}, {"a": "jar and jar"}),
        # only the stems asked for
        ({"a": "a cat", "b": "a cat"}, "cat", "dog", {"stems": ["b"]}, {"b": "a dog"}),
        # nothing matches: nothing changed
        ({"a": "a dog"}, "cat", "dog", {}, {}),
        # a replacement equal to the match changes nothing
        ({"a": "a  dog"}, "dog", "dog", {}, {}),
    ],
)
def test_replace(captions: dict, find: str, replacement: str, options: dict, expected: dict) -> None:
    stems = options.pop("stems", None)
    regex = options.get("regex", False)
    pattern = compile_find(find, **options)
    assert replace_in(captions, pattern, replacement, regex=regex, stems=stems) == expected


@pytest.mark.parametrize(
    ("find", "options", "message"),
    [
        ("", {}, "find is empty"),
        ("   ", {}, "find is empty"),
        ("(unclosed", {"regex": True}, "not a valid regular expression"),
    ],
)
def test_bad_finds_are_rejected_with_a_clear_message(find: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_find(find, **options)


def test_a_replacement_naming_a_missing_group_is_rejected() -> None:
    pattern = compile_find(r"(dog)", regex=True)
    with pytest.raises(ValueError, match="not valid for this pattern"):
        replace_in({"a": "a dog"}, pattern, r"\2", regex=True)
