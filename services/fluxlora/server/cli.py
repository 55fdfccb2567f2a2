"""The server half of the `fluxlora` command: serve, worker, up, demo and models write-tiny/write-config.

The client distribution (fluxlora-client) owns the `fluxlora` command; this distribution adds its
commands through the `fluxlora.cli` entry point group (pyproject.toml), so a machine with only the
client installed has no server commands and imports no torch. `fluxlora-server` runs these
commands alone (the containers' entry point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()

Store = Annotated[str | None, typer.Option(help="Artifact store: a directory or s3://bucket (default FLUXLORA_STORE).")]


def serve(
    service: Annotated[str, typer.Argument(help="preprocessing, captioning, training or evaluation")],
    host: Annotated[str | None, typer.Option(help="Bind address (FLUXLORA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (FLUXLORA_PORT; default per service).")] = None,
    store: Store = None,
) -> None:
    """Run one service until SIGTERM/SIGINT."""
    from fluxlora.common.config import Settings
    from fluxlora.common.logs import configure_logging
    from fluxlora.server.bootstrap import serve as serve_forever

    overrides = {k: v for k, v in {"host": host, "port": port, "store": store}.items() if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format, service)
    serve_forever(service, settings)


def worker(
    service: Annotated[str, typer.Argument(help="The service whose job handler runs the job.")],
    job_id: Annotated[str, typer.Argument(help="The stored job to run, e.g. trn-0123456789ab.")],
    store: Store = None,
) -> None:
    """Run one stored job in this process, then exit (what a Kubernetes Job's pod runs).
    Exit codes: 0 succeeded, 1 failed (a retry may help), 3 bad request, 75 interrupted."""
    from fluxlora.common.config import Settings
    from fluxlora.common.logs import configure_logging
    from fluxlora.jobs.worker import EXIT_PERMANENT, run_worker
    from fluxlora.server.services import load_definition
    from fluxlora_api.shared.ports import SERVICES

    if service not in SERVICES:
        console.print(f"[red]error[/red] unknown service {service!r}; choose one of {', '.join(SERVICES)}")
        raise typer.Exit(EXIT_PERMANENT)
    settings = Settings(store=store) if store else Settings()
    configure_logging(settings.log_level, settings.log_format, f"{service}-worker")
    raise typer.Exit(run_worker(service, job_id, settings, handler=load_definition(service).handler))


def up(
    store: Store = None,
    host: str = "127.0.0.1",
    log_dir: Annotated[Path | None, typer.Option(help="The servers' logs (default: a new temp folder).")] = None,
    grace: Annotated[float, typer.Option(help="Seconds the servers get to stop before they are killed.")] = 30.0,
    base_port: Annotated[int, typer.Option(help="Ports N..N+3 for the four services (0: 50051-50054).")] = 0,
) -> None:
    """Start all four services on localhost (default ports) until Ctrl-C or SIGTERM, which stop them
    gracefully. If one of them dies, this says which (exit code, end of its log), stops the others and
    exits with code 1: restarting is a supervisor's job (systemd, Compose, Kubernetes). The servers
    also stop when this process is killed."""
    import signal
    import tempfile
    import threading

    from rich.markup import escape

    from fluxlora.common.config import Settings
    from fluxlora.server.local import LocalServices
    from fluxlora_api.shared.ports import DEFAULT_PORTS, SERVICES

    def on_sigterm(signum, frame) -> None:
        raise KeyboardInterrupt  # what Ctrl-C does: leaves the `with` below, which stops the servers

    signal.signal(signal.SIGTERM, on_sigterm)
    settings = Settings(store=store) if store else Settings()
    logs = log_dir or Path(tempfile.mkdtemp(prefix="fluxlora-up-"))
    ports = {name: base_port + i for i, name in enumerate(SERVICES)} if base_port else dict(DEFAULT_PORTS)
    services = LocalServices(settings.store, host=host, ports=ports, log_dir=logs, stop_grace_s=grace)
    died = None
    try:
        with services:
            for name, address in services.addresses.items():
                health = services.health_ports.get(name)
                console.print(f"{name:14} {address}" + (f"  (health, plaintext: {host}:{health})" if health else ""))
            console.print(f"store          {settings.store}\nlogs           {logs}\nCtrl-C stops them.")
            died = services.supervise(threading.Event())
            if died:
                others = [name for name, p in services.processes.items() if p.poll() is None]
                console.print(f"[red]error[/red] the {died} server exited{escape(services.exit_report(died))}",
                              highlight=False)
                console.print(f"stopping {', '.join(others) or 'nothing else'}")
    except KeyboardInterrupt:
        console.print("stopping the servers")
    except RuntimeError as err:  # one exited at start (a port in use, an unusable store): the others are stopped
        console.print(f"[red]error[/red] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    if died:
        raise typer.Exit(1)


def demo(
    workdir: Annotated[Path, typer.Option(help="Where photos, models, store and outputs go.")] = Path("demo-output"),
    max_steps: int = 200,
) -> None:
    """The whole pipeline end to end on generated photos, tiny random models and local services."""
    from fluxlora.server.demo import run_demo
    from fluxlora_client.cli import print_outputs

    outputs = run_demo(workdir, max_steps=max_steps, console=console)
    print_outputs(outputs)


def write_tiny(
    out: Path,
    seed: int = 0,
    family: Annotated[str, typer.Option(help="Write only this family's tiny model (flux1-dev, chroma, flux2-dev, "
                                             "flux2-klein or flux1-kontext), as <out>/tiny-<family>.")] = "",
    single_file: Annotated[str, typer.Option(
        help="Also write the family's tiny transformer as one .safetensors file in this key layout, bfl or comfyui "
             "(<out>/tiny-<family>.safetensors, as ComfyUI users hold FLUX.1 and BFL ships FLUX.2), with "
             "<out>/tiny-<family> as its components folder; the family defaults to flux1-dev.")] = "",
    fp8: Annotated[bool, typer.Option(help="With --single-file: its weights in fp8 (float8_e4m3fn).")] = False,
) -> None:
    """Write a tiny random FLUX pipeline and Florence-2 and BLIP captioners (for demos and tests)."""
    family = family or ("flux1-dev" if single_file else "")
    if single_file not in ("", "bfl", "comfyui"):
        console.print(f"[red]error[/red] unknown --single-file layout {single_file!r}: use 'bfl' or 'comfyui'",
                      highlight=False)
        raise typer.Exit(2)
    if family:
        from fluxlora.models.tiny_family import write_tiny_family

        try:
            folder = write_tiny_family(family, out / f"tiny-{family}", seed=seed)
            console.print(f"{family} {folder}")
            if single_file:
                from fluxlora.models.single_file_write import write_folder_transformer

                file = write_folder_transformer(folder, out / f"tiny-{family}.safetensors", layout=single_file, fp8=fp8)
                console.print(f"{family} {file} ({single_file} layout{', fp8' if fp8 else ''}; components: {folder})")
        except ValueError as err:
            console.print(f"[red]error[/red] {err}", highlight=False)
            raise typer.Exit(2) from None
        return
    from fluxlora.models.tiny_blip import write_tiny_blip
    from fluxlora.models.tiny_captioner import write_tiny_florence2
    from fluxlora.models.tiny_flux import write_tiny_flux

    console.print(f"flux      {write_tiny_flux(out / 'tiny-flux', seed=seed)}")
    console.print(f"florence2 {write_tiny_florence2(out / 'tiny-florence2', seed=seed)}")
    console.print(f"blip      {write_tiny_blip(out / 'tiny-blip', seed=seed)}")


def full_size_name(name: str) -> str:
    """`name` when models/families/configs.py's FULL_SIZE has it; a usage error listing its names
    otherwise. Read when the option is parsed: importing configs loads torch (its package holds the
    families), which the other `fluxlora` commands must not pay for."""
    from fluxlora.models.families.configs import FULL_SIZE

    if name not in FULL_SIZE:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(FULL_SIZE)}")
    return name


def write_config(
    out: Path,
    family: Annotated[str, typer.Option(parser=full_size_name, help=(
        "A full-size model: a family, as its first released size (chroma, flux2-klein: 4B), or a family's "
        "other size (flux2-klein-9b); an unknown name is answered with the list."))],
) -> None:
    """Write the full-size configs of a model (model_index.json, transformer and VAE config.json;
    no weights) for memory estimates: `fluxlora models write-config --family chroma DIR`."""
    from fluxlora.models.families.configs import write_config as write

    console.print(f"{family} {write(family, out)}")  # full_size_name has checked the name


def register(app: typer.Typer) -> None:
    """Adds the server commands to a `fluxlora` Typer app (the `fluxlora.cli` entry point)."""
    from fluxlora.common.offline import configure_hf_offline

    configure_hf_offline()
    for command in (serve, worker, up, demo):
        app.command()(command)
    models = typer.Typer(help="Model helpers.", no_args_is_help=True)
    models.command("write-tiny")(write_tiny)
    models.command("write-config")(write_config)
    app.add_typer(models, name="models")


def main() -> None:
    """`fluxlora-server`: the server commands alone."""
    app = typer.Typer(help="fluxlora servers and workers.", no_args_is_help=True, pretty_exceptions_enable=False)
    register(app)
    app()


if __name__ == "__main__":
    main()
