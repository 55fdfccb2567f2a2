"""The fluxlora command line, built on the SDK.

    fluxlora demo                      # the whole pipeline on generated photos and tiny models
    fluxlora up                        # start the four services on localhost
    fluxlora pipeline photos/ --trigger ohwx --base-model /models/flux1-dev --caption-model /models/florence2
    fluxlora preprocess | caption | train | evaluate   # one stage at a time
    fluxlora caption list | edit | replace | review | approve | export DATASET   # caption review
    fluxlora generate "ohwx, a bottle on a beach" --lora trn-0123456789ab:1500@0.8
    fluxlora jobs list training
    fluxlora serve training ; fluxlora worker training trn-0123456789ab   # in containers and Kubernetes Jobs

demo, up, serve, worker and models come from the server distribution (fluxlora.server.cli), which
adds them through the `fluxlora.cli` entry point group; the client alone has the rest: the stages
and pipeline in stage_cli, `jobs` in jobs_cli, `caption` in caption_cli, what they print in cli_reports
and cli_support.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from fluxlora_client import cli_reports
from fluxlora_client.caption_cli import caption_app
from fluxlora_client.cli_reports import outputs_json, plan_flags
from fluxlora_client.cli_reports import print_plan as _print_plan
from fluxlora_client.cli_support import _client, console, err_console
from fluxlora_client.errors import FluxloraClientError
from fluxlora_client.jobs_cli import jobs_app
from fluxlora_client.stage_cli import add_stage_commands

# What others import from here: the entry point, the tests, and the server's `fluxlora demo` (print_outputs).
__all__ = ["app", "main", "_client", "_print_plan", "outputs_json", "plan_flags", "print_outputs"]

app = typer.Typer(help="Turn a folder of photos into a tested FLUX.1 LoRA.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(jobs_app, name="jobs")
app.add_typer(caption_app, name="caption")
add_stage_commands(app)


def print_outputs(outputs) -> None:
    """Where the pipeline's outputs are, as `fluxlora pipeline` prints them, on this module's console
    (the server's `fluxlora demo` prints them too)."""
    cli_reports.print_outputs(outputs, console)


def _add_plugins(target: typer.Typer) -> None:
    """Commands other installed distributions add (the server's: serve, worker, up, demo, models)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="fluxlora.cli"):
        entry.load()(target)


_add_plugins(app)


def main() -> None:
    from fluxlora_api.shared.errors import FluxloraError

    try:
        app()
    except (FluxloraClientError, FluxloraError) as err:
        # FluxloraError: the store itself (misconfigured, unreachable) fails before any RPC.
        # Messages name user files, which may hold "[...]": never read them as rich markup.
        err_console.print(f"[red]error[/red] {err.code}: {escape(err.message)}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
