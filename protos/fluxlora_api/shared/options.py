"""Command-line options derived from a spec message's descriptor: each option is declared once, as a
proto field with its comment, and the CLI, the SDK's keyword arguments and docs/api.md follow.

    specs = option_specs(training_pb2.TrainSpec.DESCRIPTOR, exclude={"dataset_id"})
    spec = build_message(training_pb2.TrainSpec, {"max_steps": 10, "optimizer": "prodigy"})

A spec built here holds only the values given: the server fills in the rest, from its one table of
defaults (the comments say "default: X" for each, and tests/unit/test_option_agreement.py checks
that they agree). Pure: protobuf only, so clients and services can both use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

INT, FLOAT, BOOL, STR, ENUM, MESSAGE = "int", "float", "bool", "str", "enum", "message"
_KINDS = {
    FieldDescriptor.CPPTYPE_INT32: INT, FieldDescriptor.CPPTYPE_INT64: INT,
    FieldDescriptor.CPPTYPE_UINT32: INT, FieldDescriptor.CPPTYPE_UINT64: INT,
    FieldDescriptor.CPPTYPE_FLOAT: FLOAT, FieldDescriptor.CPPTYPE_DOUBLE: FLOAT,
    FieldDescriptor.CPPTYPE_BOOL: BOOL, FieldDescriptor.CPPTYPE_STRING: STR,
    FieldDescriptor.CPPTYPE_ENUM: ENUM, FieldDescriptor.CPPTYPE_MESSAGE: MESSAGE,
}
_PROTO_KINDS = {
    **dict.fromkeys(("TYPE_INT32", "TYPE_INT64", "TYPE_UINT32", "TYPE_UINT64", "TYPE_SINT32", "TYPE_SINT64"), INT),
    "TYPE_FLOAT": FLOAT, "TYPE_DOUBLE": FLOAT, "TYPE_BOOL": BOOL, "TYPE_STRING": STR, "TYPE_ENUM": ENUM,
    "TYPE_MESSAGE": MESSAGE,
}
INT_RANGES = {FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
              FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
              FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1)}
HELP_CHARS = 200  # help text: whole sentences of the comment up to about this many characters
_DEFAULT = re.compile(r"\bdefault:\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


@dataclass(frozen=True)
class OptionSpec:
    """One spec field as a command-line option."""

    field: str  # the proto field name, e.g. "max_steps"
    flag: str  # "--max-steps"
    kind: str  # int, float, bool, str, enum or message
    repeated: bool
    has_presence: bool  # proto3 `optional` (or a message): unset differs from 0 / false / ""
    choices: tuple[str, ...]  # enum values by short name ("bucket" for CROP_MODE_BUCKET)
    help: str  # the comment's first sentences, with its default
    default: str | None  # the text after "default:" in the comment, as written
    int_range: tuple[int, int] | None = None


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def enum_choices(enum: EnumDescriptor | descriptor_pb2.EnumDescriptorProto) -> dict[str, int]:
    """Short lower-case names -> numbers, the UNSPECIFIED (zero) value left out: CropMode's
    CROP_MODE_BUCKET is "bucket"."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    values = enum.values if isinstance(enum, EnumDescriptor) else enum.value
    return {v.name.removeprefix(prefix).lower(): v.number for v in values if v.number != 0}


def default_text(comment: str) -> str | None:
    """What a comment says the default is ("default: 3000" -> "3000"), or None when it says nothing.
    It runs to the end of the sentence or clause (";", a closing bracket it did not open, or an
    explanation in parentheses after a space)."""
    match = _DEFAULT.search(comment)
    if match is None:
        return None
    rest = " ".join(comment[match.end():].split())
    out: list[str] = []
    depth, quote = 0, ""
    for i, ch in enumerate(rest):
        if quote:
            quote = "" if ch == quote else quote
        elif ch == '"':
            quote = ch
        elif ch in "([":
            if depth == 0 and ch == "(" and out and out[-1] == " ":
                break
            depth += 1
        elif ch in ")]":
            if depth == 0:
                break
            depth -= 1
        elif depth == 0 and (ch == ";" or (ch == "." and rest[i + 1:i + 2] in ("", " "))):
            break
        out.append(ch)
    return "".join(out).strip()


def default_value(comment: str) -> Any:
    """The default as a value (42, 1e-4, true, "constant", [...]); the text itself when it is words
    ("the run's resolution"); None when the comment states none."""
    text = default_text(comment)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def help_text(comment: str, chars: int = HELP_CHARS) -> str:
    """The comment's first sentences (at least one, up to about `chars`), on one line, with the default
    appended when the kept sentences do not state it."""
    text = " ".join(comment.split())
    kept = ""
    for sentence in _SENTENCE_END.split(text):
        if kept and len(kept) + 1 + len(sentence) > chars:
            break
        kept = f"{kept} {sentence}".strip()
    default = default_text(comment)
    if default is not None and default_text(kept) is None:
        kept = f"{kept.rstrip('.')}; default: {default}."
    return kept


def option_specs(message: Descriptor, comments: Mapping[str, str] | None = None,
                 exclude: Iterable[str] = ()) -> list[OptionSpec]:
    """Every field of `message` but `exclude`, as options, in field-number order. `comments`: field ->
    comment (fluxlora_api.v1.field_docs.COMMENTS[message.full_name] by default)."""
    if comments is None:
        from fluxlora_api.v1.field_docs import COMMENTS

        comments = COMMENTS.get(message.full_name, {})
    skip = set(exclude)
    specs = []
    for field in sorted(message.fields, key=lambda f: f.number):
        if field.name in skip:
            continue
        comment = comments.get(field.name, "")
        kind = _KINDS[field.cpp_type]
        choices = tuple(enum_choices(field.enum_type)) if kind == ENUM and field.enum_type else ()
        specs.append(OptionSpec(
            field=field.name, flag=flag_name(field.name), kind=kind, repeated=field.is_repeated,
            has_presence=field.has_presence, choices=choices, help=help_text(comment),
            default=default_text(comment), int_range=INT_RANGES.get(field.cpp_type),
        ))
    return specs


def build_message(message_type: type[Message], values: Mapping[str, Any]) -> Any:
    """A message holding exactly `values` (field -> value; enum values by short name, number or full
    name); unknown fields and enum names raise ValueError naming them."""
    message = message_type()
    fields = message_type.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        if name not in fields:
            raise ValueError(f"{message_type.DESCRIPTOR.name} has no field {name!r}")
        field = fields[name]
        if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
            value = [_enum_number(field, v) for v in value] if field.is_repeated else _enum_number(field, value)
        if field.is_repeated:
            target = getattr(message, name)
            if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                for item in value:
                    _add(target, item)
            else:
                target.extend(value)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _add(target, value) -> None:
    if isinstance(value, Mapping):
        item = target.add()
        item.CopyFrom(build_message(type(item), value))
    else:
        target.add().CopyFrom(value)


def _enum_number(field: Any, value: Any) -> int:
    """An enum field's number for `value` (a FieldDescriptor of either protobuf implementation)."""
    if isinstance(value, int):
        return value
    assert field.enum_type is not None  # only enum fields come here
    choices = enum_choices(field.enum_type)
    number = choices.get(str(value).lower())
    if number is None and str(value) in field.enum_type.values_by_name:
        number = field.enum_type.values_by_name[str(value)].number
    if number is None:
        raise ValueError(f"{field.name} must be one of {', '.join(choices)}, not {value!r}")
    return number


def markdown_table(message: descriptor_pb2.DescriptorProto, comments: Mapping[str, str],
                   enums: Mapping[str, descriptor_pb2.EnumDescriptorProto]) -> str:
    """docs/api.md's table of a spec message's fields: option, type, default and what it does, all
    from the proto (generate.py writes it between the message's markers)."""
    rows = ["| field | type | default | what it is |", "|---|---|---|---|"]
    for field in sorted(message.field, key=lambda f: f.number):
        comment = comments.get(field.name, "")
        kind = _PROTO_KINDS[descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)]
        if kind == ENUM:
            kind = " \\| ".join(enum_choices(enums[field.type_name.lstrip(".")]))
        elif kind == MESSAGE:
            kind = field.type_name.rsplit(".", 1)[-1]
        if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            kind = f"list of {kind}"
        elif field.proto3_optional:
            kind = f"optional {kind}"
        default = default_text(comment)
        what = " ".join(comment.split()).replace("|", "\\|")
        rows.append(f"| `{field.name}` | {kind} | "
                    f"{default.replace('|', chr(92) + '|') if default is not None else ''} | {what} |")
    return "\n".join(rows) + "\n"
