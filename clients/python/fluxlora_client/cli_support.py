"""What every `fluxlora` command shares: the consoles (results on stdout; progress, warnings and
errors on stderr), the SDK client from the environment, following a job to its result, and the
two ways a result is printed: a table a person reads (the default) or `--json` for machines."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

JsonOutput = Annotated[bool, typer.Option("--json", help="Print the result as JSON (camelCase, as every "
                                                        "command's --json) instead of a table.")]


def _client():
    """An SDK client from FLUXLORA_<SERVICE>_ADDR, the token and TLS settings: no store needed."""
    from fluxlora_client.client import FluxloraClient

    return FluxloraClient.from_env()


def _run_job(client, label: str, job, warnings: list[str] | None = None):
    """Follows a job with a progress line on stderr (each warning printed once, also appended to
    `warnings`) and returns its result."""
    from fluxlora_client.errors import JobFailed
    from fluxlora_client.progress import JobProgress

    with JobProgress() as progress:
        try:
            final = client.wait(job, on_event=lambda e: progress.on_event(label, e))
        except JobFailed as failed:  # "the uploaded folder ..." names the user's own folder
            failed.message = _localized(client, failed.job, failed.message)
            failed.args = (f"{failed.code}: {failed.message}",)
            raise
        for warning in final.warnings:
            progress.warn(label, _localized(client, final, warning))
    if warnings is not None:
        warnings.extend(progress.warnings)
    return client.result(final)


def _localized(client, job, message: str) -> str:
    """A preprocessing job's message with the uploaded folder named as the local folder it came from
    (fluxlora_client.uploads: this process uploaded it); other messages as they are."""
    from fluxlora_client import uploads

    if job is None or job.service != "preprocessing":
        return message
    return uploads.localize(message, client.spec(job).source_prefix)


@contextlib.contextmanager
def busy(message: str) -> Iterator[None]:
    """A spinner on stderr for anything that may take over a second (nothing when not a terminal)."""
    with err_console.status(escape(message), spinner="dots"):
        yield


def table(*columns: str, title: str | None = None, **kwargs: Any) -> Table:
    """A rich Table whose cells wrap (long words and paths fold onto the next line) and are never cut
    with an ellipsis, so whatever a person copies out of it is whole."""
    out = Table(title=escape(title) if title else None, **kwargs)
    for column in columns:
        out.add_column(column, overflow="fold")
    return out


def as_json(message: Message) -> str:
    """Every command's JSON: protobuf's JSON mapping (camelCase field names)."""
    return json_format.MessageToJson(message)


def _print_result(result: Message, json_output: bool = True, counted: frozenset[str] = frozenset()) -> None:
    """The one output of a command: the result as JSON, or as a table (`counted` fields as a count)."""
    if json_output:
        console.print_json(as_json(result))
    else:
        console.print(result_table(result, counted=counted))


def result_table(result: Message, title: str | None = None, counted: frozenset[str] = frozenset()) -> Table:
    """A result message as a two-column table of its fields (nested messages one line each)."""
    out = table("field", "value", title=title or result.DESCRIPTOR.name, show_header=False)
    for name, text in _rows(result, "", counted):
        out.add_row(name, escape(text))
    return out


def _rows(message: Message, prefix: str, counted: frozenset[str] = frozenset()) -> Iterator[tuple[str, str]]:
    for field, value in message.ListFields():
        name = prefix + field.name
        if field.name in counted:
            yield name, f"{len(value)} (--json lists them)"
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            yield name, ", ".join(f"{k}={_scalar(field.message_type.fields_by_name['value'], v)}"
                                  for k, v in sorted(value.items()))
        elif field.is_repeated:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                yield name, "\n".join(_inline(item) for item in value)
            else:
                yield name, ", ".join(_scalar(field, v) for v in value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if prefix:
                yield name, _inline(value)
            else:
                yield from _rows(value, name + ".")
        else:
            yield name, _scalar(field, value)


def _inline(message: Message) -> str:
    return "  ".join(f"{f.name} {_scalar(f, v)}" for f, v in message.ListFields())


def _scalar(field: FieldDescriptor, value: Any) -> str:
    if field.is_repeated and not isinstance(value, str | int | float | bool):
        return ", ".join(_scalar_one(field, v) for v in value)
    return _scalar_one(field, value)


def _scalar_one(field: FieldDescriptor, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Message):
        return _inline(value)
    return str(value)
