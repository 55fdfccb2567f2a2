"""Size limits on what one request may ask of a server, checked at the servicers' edge.

Each refusal names the field, the value, the limit and the FLUXLORA_* setting that raises it, so
the person who hits one can tell a mistake (a pasted file as a caption, max_steps with a zero too
many) from a limit their deployment should raise. Values beyond a fixed request limit are
INVALID_ARGUMENT (like FLUXLORA_GRID_MAX_CELLS); bytes beyond what a server takes in are
RESOURCE_EXHAUSTED, as gRPC answers an oversized message.

Every numeric field of every job spec has a Bound (check_numbers), refused at submit with
INVALID_ARGUMENT naming the field, the value and the range; NaN and infinity are refused. The tables
live in each service's validation code and are checked for completeness by the unit tests.

Limits fixed in code rather than settings live beside what they protect:
fluxlora.preprocessing.images.MAX_IMAGE_PIXELS (decompression bombs), ArchiveLimits in
fluxlora.domain.archives (zip bombs), MAX_SIDE / MAX_STEPS in fluxlora.evaluation.validation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from fluxlora_api.shared.errors import InvalidArgument


def normalised_caption(text: str) -> str:
    """A caption as it is stored: whitespace runs collapsed (what counts against the limit)."""
    return " ".join((text or "").split())


def check_caption_lengths(captions: Mapping[str, str], limit: int, field: str) -> None:
    """INVALID_ARGUMENT naming the longest captions when any, as stored, is longer than `limit` characters."""
    lengths = {stem: len(normalised_caption(text)) for stem, text in captions.items()}
    over = sorted((stem for stem, n in lengths.items() if n > limit), key=lambda s: (-lengths[s], s))
    if over:
        shown = ", ".join(f"{stem!r} is {lengths[stem]} characters" for stem in over[:5])
        more = f" ({len(over) - 5} more are over it too)" if len(over) > 5 else ""
        raise InvalidArgument(
            f"{field}: {shown}{more}; the limit is {limit} characters (FLUXLORA_MAX_CAPTION_CHARS). FLUX's "
            "text encoders read at most 512 tokens (about 2,000 characters): shorten the caption, or raise "
            "FLUXLORA_MAX_CAPTION_CHARS on the captioning server"
        )


def check_text_length(value: str, limit: int, field: str) -> None:
    """INVALID_ARGUMENT when one text field (a find or replace string) is longer than `limit` characters."""
    if len(value) > limit:
        raise InvalidArgument(
            f"{field} is {len(value)} characters, over the limit of {limit} (FLUXLORA_MAX_CAPTION_CHARS): "
            "shorten it or raise FLUXLORA_MAX_CAPTION_CHARS on the captioning server"
        )


def check_train_steps(max_steps: int, limit: int) -> None:
    """INVALID_ARGUMENT when a run asks for more optimiser steps than the server allows."""
    if max_steps > limit:
        raise InvalidArgument(
            f"spec.max_steps is {max_steps}, over the limit of {limit} (FLUXLORA_MAX_TRAIN_STEPS): a FLUX LoRA "
            "converges in a few thousand steps, so lower max_steps or raise FLUXLORA_MAX_TRAIN_STEPS on the "
            "training server"
        )


# --- numeric fields of job specs ------------------------------------------------------------------
_NUMBERS = {FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
            FieldDescriptor.CPPTYPE_UINT64, FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE}
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Bound:
    """The closed range a numeric spec field may take, and why (the default 0 stands for, the setting
    that raises it, what the machine can do), for the message that refuses a value outside it."""

    low: float
    high: float
    why: str = ""

    def text(self) -> str:
        return f"[{_number(self.low)}, {_number(self.high)}]" + (f" ({self.why})" if self.why else "")


def numeric_fields(descriptor: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every numeric field of a message type, nested messages included (enums and
    bools are not numbers here): what a spec's bounds table must cover."""
    paths = []
    for field in descriptor.fields:
        path = prefix + field.name
        if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            paths += numeric_fields(field.message_type, path + ".")
        elif field.cpp_type in _NUMBERS:
            paths.append(path)
    return paths


def check_numbers(message: Message, bounds: Mapping[str, Bound], name: str = "spec") -> None:
    """INVALID_ARGUMENT naming the field, the value and the allowed range for the first numeric field
    of `message` (nested messages and repeated fields included) outside its bound; NaN and infinity
    are refused everywhere. A numeric field with no entry in `bounds` is a programming error."""
    _check(message, bounds, name, "")


def _check(message: Message, bounds: Mapping[str, Bound], shown: str, path: str) -> None:
    for field, value in message.ListFields():
        key = path + field.name
        where = f"{shown}.{field.name}"
        repeated = field.is_repeated
        if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            for i, item in enumerate(value if repeated else [value]):
                _check(item, bounds, f"{where}[{i}]" if repeated else where, key + ".")
            continue
        if field.cpp_type not in _NUMBERS:
            continue
        if key not in bounds:
            raise KeyError(f"no bound for the numeric field {key} of {message.DESCRIPTOR.full_name}")
        bound = bounds[key]
        for i, number in enumerate(value if repeated else [value]):
            label = f"{where}[{i}]" if repeated else where
            if isinstance(number, float) and not math.isfinite(number):
                raise InvalidArgument(f"{label} is {number}, not a finite number: use a value in {bound.text()}")
            if not bound.low <= number <= bound.high:
                raise InvalidArgument(f"{label} is {_number(number)}, outside the allowed range {bound.text()}")


def _number(value: float) -> str:
    return f"{value}" if isinstance(value, float) else f"{int(value)}"
