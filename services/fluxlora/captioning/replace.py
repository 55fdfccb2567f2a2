"""Bulk find/replace over a set of captions (pure; no store)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from fluxlora.captioning.cleaning import normalize


def compile_find(find: str, *, regex: bool = False, substring: bool = False,
                 case_sensitive: bool = False) -> re.Pattern[str]:
    """The pattern for `find`: literal text unless regex; whole words only unless substring.

    Whole-word matching puts a word boundary only where `find` starts or ends with a letter or
    digit, so "red car" never matches inside "scared cars" yet "," still matches any comma.
    """
    if not find or not find.strip():
        raise ValueError("find is empty: give the text (or, with regex, the pattern) to look for")
    body = find if regex else re.escape(find)
    if not substring:
        if regex:
            body = rf"(?<!\w)(?:{body})(?!\w)"
        else:
            start = r"(?<!\w)" if re.match(r"\w", find) else ""
            end = r"(?!\w)" if re.search(r"\w$", find) else ""
            body = start + body + end
    try:
        return re.compile(body, 0 if case_sensitive else re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"find {find!r} is not a valid regular expression: {exc}") from None


def replace_in(captions: Mapping[str, str], pattern: re.Pattern[str], replacement: str, *, regex: bool = False,
               stems: Iterable[str] | None = None) -> dict[str, str]:
    """{stem: new caption} for the captions the replacement changed (others are left out).

    With regex, replacement may use \\1 or \\g<name>; otherwise it is literal text. Changed captions
    are normalised, so deleting a word leaves no double space or stray comma behind.
    """
    only = set(stems) if stems else None
    changed = {}
    for stem, caption in captions.items():
        if only is not None and stem not in only:
            continue
        try:
            new = pattern.sub(replacement if regex else (lambda _m: replacement), caption)
        except (re.error, IndexError) as exc:
            raise ValueError(f"replacement {replacement!r} is not valid for this pattern: {exc}") from None
        if new != caption:
            changed[stem] = normalize(new)
    return changed
