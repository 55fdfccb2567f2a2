"""`fluxlora caption ...`: auto-caption a dataset, then review, approve and export its captions.

    fluxlora caption ds-1a2b --trigger ohwx --remove bottle    # auto-caption (same as `caption run`)
    fluxlora caption list ds-1a2b                              # captions with trigger counts
    fluxlora caption edit ds-1a2b img-003 "ohwx, a bottle on a beach"
    fluxlora caption replace ds-1a2b plastic glass
    fluxlora caption review ds-1a2b --out review.html          # edit in a browser ...
    fluxlora caption import-review ds-1a2b ds-1a2b-v4-edits.json
    fluxlora caption approve ds-1a2b                           # training uses this version
    fluxlora caption history ds-1a2b
    fluxlora caption export ds-1a2b --out kohya/ [--zip] [--repeats 10]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from fluxlora_api.v1 import captioning_pb2
from fluxlora_client.spec_options import SpecCommand, spec_options

Version = Annotated[int, typer.Option(help="Caption version (0: the latest).")]
Comment = Annotated[str, typer.Option(help="Why: kept in the version history.")]


class _CaptionGroup(TyperGroup):
    """`fluxlora caption DATASET --trigger ...` (no sub-command name) means `caption run DATASET ...`."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands:
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


caption_app = typer.Typer(
    cls=_CaptionGroup,
    help="Auto-caption a dataset (caption DATASET --trigger WORD), then review, approve and export its captions.",
    no_args_is_help=True,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)


def _cli():
    from fluxlora_client import cli_support

    return cli_support


def _print_change(change, what: str) -> None:
    console = _cli().console
    version = change.version
    if change.created:
        console.print(f"{what}: {len(change.changed_stems)} caption(s) changed -> version {version.version}"
                      + (" (approved)" if version.approved else ""))
    else:
        console.print(f"{what}: nothing changed; version {version.version} stays"
                      + (" (approved)" if version.approved else ""))
    for stem in change.changed_stems:
        console.print(f"  {escape(stem)}")
    for warning in change.warnings:
        console.print(f"[yellow]warning[/yellow] {escape(warning)}")


@caption_app.command("run", cls=SpecCommand)
@spec_options(captioning_pb2.CaptionSpec, exclude={"dataset_id"}, aliases={
    "trigger_word": ["--trigger"], "remove_phrases": ["--remove"], "trigger_position": ["--position"]})
def run(dataset_id: str, json_output: Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON (camelCase, as every command's --json) instead of a table.")] = False,
        spec: dict | None = None) -> None:
    """Auto-caption a dataset and bind it to a trigger word (a draft version to review and approve).
    Options left out take the server's defaults."""
    cli = _cli()
    client = cli._client()
    job = client.caption(dataset_id, **(spec or {}))
    result = cli._run_job(client, "caption", job)  # its warnings: once each, on stderr
    cli._print_result(result, json_output)


@caption_app.command("list")
def list_(dataset_id: str, version: Version = 0, urls: Annotated[bool, typer.Option(
        help="Print a download URL per image.")] = False) -> None:
    """Captions of a version with their images and trigger counts."""
    cli = _cli()
    listing = cli._client().captions.list(dataset_id, version, include_urls=urls)
    info = listing.version
    title = (f"{dataset_id} version {info.version} ({info.kind}{', approved' if info.approved else ''}); "
             f"latest {listing.head_version}, approved {listing.approved_version or 'none'}")
    table = Table("stem", "trigger", "caption", *(["image"] if urls else []), title=escape(title))
    for entry in listing.entries:
        count = f"{entry.trigger_count}" if entry.trigger_count == 1 else f"[red]{entry.trigger_count}[/red]"
        table.add_row(escape(entry.stem), count, escape(entry.caption), *([entry.image_url] if urls else []))
    cli.console.print(table)


@caption_app.command("edit")
def edit(dataset_id: str, stem: str, caption: str, base_version: Version = 0, comment: Comment = "") -> None:
    """Change one caption (stored as a new version)."""
    change = _cli()._client().captions.edit(dataset_id, {stem: caption}, base_version=base_version,
                                                  comment=comment)
    _print_change(change, "edit")


@caption_app.command("replace")
def replace(
    dataset_id: str,
    find: str,
    replacement: Annotated[str, typer.Argument(help="Replacement text ('' deletes).")],
    regex: Annotated[bool, typer.Option(help="FIND is a regular expression (REPLACEMENT may use \\1).")] = False,
    substring: Annotated[bool, typer.Option(help="Match inside words too (default: whole words).")] = False,
    case_sensitive: bool = False,
    stem: Annotated[list[str] | None, typer.Option(help="Only this caption (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Show what would change; store nothing.")] = False,
    comment: Comment = "",
) -> None:
    """Find/replace across all captions (stored as a new version)."""
    change = _cli()._client().captions.replace(
        dataset_id, find, replacement, regex=regex, substring=substring, case_sensitive=case_sensitive,
        stems=stem or [], dry_run=dry_run, comment=comment,
    )
    _print_change(change, "replace (dry run)" if dry_run else "replace")


@caption_app.command("approve")
def approve(
    dataset_id: str,
    version: Version = 0,
    fix_triggers: Annotated[bool, typer.Option(help="Put the trigger exactly once where it is missing or repeated.")]
    = False,
    comment: Comment = "",
) -> None:
    """Approve a version: training then trains on exactly these captions."""
    change = _cli()._client().captions.approve(dataset_id, version, fix_triggers=fix_triggers, comment=comment)
    _print_change(change, "approve")


@caption_app.command("history")
def history(dataset_id: str) -> None:
    """Every caption version, oldest first."""
    cli = _cli()
    found = cli._client().captions.history(dataset_id)
    table = Table("version", "parent", "kind", "approved", "changed", "author", "created", "comment",
                  title=f"{dataset_id}: latest {found.head_version}, approved {found.approved_version or 'none'}")
    for v in found.versions:
        table.add_row(str(v.version), str(v.parent or ""), v.kind, "yes" if v.approved else "",
                      str(len(v.changed_stems)), escape(v.author), v.created_at.ToJsonString(), escape(v.comment))
    cli.console.print(table)


@caption_app.command("review")
def review(
    dataset_id: str,
    out: Annotated[Path, typer.Option(help="The HTML page to write.")] = Path("review.html"),
    version: Version = 0,
    image_size: Annotated[int, typer.Option(help="Longest thumbnail side in px (0: full images).")] = 512,
) -> None:
    """Write a self-contained HTML page: images beside editable captions, and a Download edits button."""
    cli = _cli()
    path = cli._client().captions.write_review_page(dataset_id, out, version=version, image_size=image_size)
    cli.console.print(f"wrote {escape(str(path))}: open it in a browser, edit, press Download edits, then run\n"
                      f"  fluxlora caption import-review {dataset_id} <the downloaded .json>")


@caption_app.command("import-review")
def import_review(dataset_id: str, edits: Annotated[Path, typer.Argument(help="JSON saved by the review page.")],
                  comment: Comment = "") -> None:
    """Store the edits saved from a review page as a new version."""
    change = _cli()._client().captions.import_review(dataset_id, edits, comment=comment)
    _print_change(change, "import-review")


@caption_app.command("export")
def export(
    dataset_id: str,
    out: Annotated[Path, typer.Option(help="Folder to write into.")],
    version: Annotated[int, typer.Option(help="Caption version (0: the approved one).")] = 0,
    as_zip: Annotated[bool, typer.Option("--zip", help="Download the zip instead of unpacking it.")] = False,
    repeats: Annotated[int, typer.Option(help="kohya '<repeats>_<trigger>' folder inside the export.")] = 0,
) -> None:
    """Export images with same-stem .txt captions, kohya-style (a folder or a zip)."""
    cli = _cli()
    path = cli._client().captions.export(dataset_id, out, version=version, as_zip=as_zip, repeats=repeats)
    cli.console.print(f"exported to {escape(str(path))}")
