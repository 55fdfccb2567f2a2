"""Command-line options made from a spec message (fluxlora_api.shared.options): a command says
which message it submits, and every field of it the command does not take otherwise becomes an
option, with the proto comment as help and the enum values as choices. The command receives what
the user set, and only that, as `spec`; the server applies its defaults to the rest.

    @app.command(cls=SpecCommand)
    @spec_options(training_pb2.TrainSpec, exclude={"dataset_id"})
    def train(dataset_id: str, spec: dict) -> None:
        client.train(dataset_id, **spec)

Built on typer's public API only (a generated signature of Annotated typer.Option parameters).
"""

from __future__ import annotations

import enum
import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from fluxlora_api.shared.options import BOOL, ENUM, FLOAT, INT, MESSAGE, OptionSpec, option_specs

_PREFIX = "spec__"


class SpecCommand(TyperCommand):
    """click's plain help for commands with many options: it wraps at the terminal (80 columns at
    most) and puts a long option name on a line of its own instead of cutting it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None


def numbers(text: str, kind: type, flag: str) -> list:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]; a bad number is a usage error naming the flag."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(kind(part))
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise typer.BadParameter(f"{part!r} is not {what} (give {flag} 1,2,3 or repeat it)",
                                     param_hint=f"'{flag}'") from None
    return out


def _parameter(spec: OptionSpec, aliases: Iterable[str], panel: str) -> tuple[Any, Callable[[Any], Any]]:
    """The annotation of one field's typer option, and how its value becomes the field's value."""
    decls = [spec.flag, *aliases]
    common: dict[str, Any] = {"help": spec.help, "show_default": False, "rich_help_panel": panel}
    identity: Callable[[Any], Any] = lambda value: value  # noqa: E731
    if spec.kind == BOOL:
        if spec.has_presence:
            decls[0] = f"{spec.flag}/--no-{spec.flag[2:]}"
        return Annotated[bool | None, typer.Option(*decls, **common)], identity
    if spec.kind in (INT, FLOAT) and spec.repeated:
        kind = int if spec.kind == INT else float
        metavar = "INTS" if kind is int else "NUMBERS"

        def convert(values: list[str]) -> list:
            return [n for text in values for n in numbers(text, kind, spec.flag)]

        return Annotated[list[str] | None, typer.Option(*decls, metavar=metavar, **common)], convert
    if spec.kind == ENUM:
        choices = enum.Enum(spec.field.title().replace("_", ""), {c: c for c in spec.choices}, type=str)
        kind_type: Any = list[choices] if spec.repeated else choices
        if spec.repeated:
            return (Annotated[kind_type | None, typer.Option(*decls, **common)],
                    lambda values: [v.value for v in values])
        return Annotated[kind_type | None, typer.Option(*decls, **common)], lambda value: value.value
    base: Any = {INT: int, FLOAT: float}.get(spec.kind, str)
    if spec.repeated:
        return Annotated[list[base] | None, typer.Option(*decls, metavar="TEXT", **common)], identity
    if spec.kind == INT and spec.int_range:
        low, high = spec.int_range

        def in_range(value: int) -> int:
            if not low <= value <= high:
                raise typer.BadParameter(f"{value} is out of range", param_hint=f"'{spec.flag}'")
            return value

        return Annotated[int | None, typer.Option(*decls, **common)], in_range
    return Annotated[base | None, typer.Option(*decls, **common)], identity


def spec_options(message_type: type, exclude: Iterable[str] = (),
                 aliases: Mapping[str, Iterable[str]] | None = None) -> Callable[[Callable], Callable]:
    """Decorate a command taking `spec: dict`: every field of the message but `exclude` becomes an
    option after the command's own parameters; `spec` receives the fields the user set. Message
    fields (LoRA lists) must be excluded and given an option of the command's own."""
    aliases = aliases or {}
    panel = f"{message_type.DESCRIPTOR.name} options"
    specs = option_specs(message_type.DESCRIPTOR, exclude=exclude)
    for spec in specs:
        if spec.kind == MESSAGE:
            raise TypeError(f"{message_type.__name__}.{spec.field} is a message: exclude it and give it an option")

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "spec"]
        converters: dict[str, Callable[[Any], Any]] = {}
        generated = []
        for spec in specs:
            annotation, converters[spec.field] = _parameter(spec, aliases.get(spec.field, ()), panel)
            generated.append(inspect.Parameter(_PREFIX + spec.field, inspect.Parameter.KEYWORD_ONLY,
                                               default=None, annotation=annotation))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {}
            for name in [n for n in kwargs if n.startswith(_PREFIX)]:
                value = kwargs.pop(name)
                if value is None or (isinstance(value, list) and not value):
                    continue
                field = name[len(_PREFIX):]
                values[field] = converters[field](value)
            return command(**kwargs, spec=values)

        params = [*own, *generated]
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the generated signature, not the command's
        wrapper.message_type = message_type  # type: ignore[attr-defined]
        return wrapper

    return decorate
