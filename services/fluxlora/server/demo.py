"""`fluxlora demo`: the whole pipeline on this machine with nothing downloaded.

Generates photos of a bottle labelled "FLUX ONE", writes a tiny random FLUX pipeline and a tiny
Florence-2, starts the four services as local processes on a local-directory store, and runs
preprocess -> caption -> approve -> train -> evaluate through the SDK over gRPC: the pipeline
approves the cleaned auto captions as a caption version ("pipeline") and trains on exactly it
(the final table names the version).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fluxlora.server.local import LocalServices
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora_client.pipeline import PipelineOptions, PipelineOutputs, run_pipeline
from fluxlora_client.progress import JobProgress

TRIGGER = "fluxone"
# Tiny model, small images: the demo shows every stage working in minutes on 2 CPU cores.
DEMO_SIZE = 64


def demo_options(models: Path, max_steps: int) -> PipelineOptions:
    every = max(1, max_steps // 4)
    return PipelineOptions(
        trigger_word=TRIGGER,
        base_model=str(models / "tiny-flux"),
        caption_model=str(models / "tiny-florence2"),
        base_size=DEMO_SIZE,
        remove_phrases=["bottle"],
        caption={"max_new_tokens": 16},
        train={
            "resolution": DEMO_SIZE,
            "max_steps": max_steps,
            "checkpoint_every": every,
            "sample_every": every,
            "learning_rate": 1e-3,
            "rank": 8,
            "sample_steps": 4,
            "target_modules": ATTENTION_AND_MLP_TARGETS,
        },
        grid={"steps": 4},
    )


def prepare(workdir: Path) -> tuple[Path, Path]:
    from fluxlora.demo.sample_data import write_sample_photos
    from fluxlora.models.tiny_captioner import write_tiny_florence2
    from fluxlora.models.tiny_flux import write_tiny_flux

    photos, models = workdir / "photos", workdir / "models"
    if not photos.exists():
        write_sample_photos(photos, count=24)
    if not (models / "tiny-flux" / "model_index.json").exists():
        write_tiny_flux(models / "tiny-flux")
    if not (models / "tiny-florence2" / "config.json").exists():
        write_tiny_florence2(models / "tiny-florence2")
    return photos, models


def run_demo(workdir: Path, max_steps: int = 200, console: Console | None = None) -> PipelineOutputs:
    console = console or Console()
    workdir = workdir.resolve()
    console.print(f"[bold]fluxlora demo[/bold] in {workdir}")
    photos, models = prepare(workdir)
    console.print(f"photos: {photos}  models: {models}")
    store_dir = workdir / "store"
    with LocalServices(store_dir, log_dir=workdir / "logs") as services:
        console.print("services: " + ", ".join(f"{n} {a}" for n, a in services.addresses.items()))
        # The servers inherit FLUXLORA_AUTH_TOKEN(_FILE) and FLUXLORA_TLS_* from this process: the client
        # sends the same token and trusts FLUXLORA_TLS_CA_FILE.
        with services.client() as client, JobProgress(console) as progress:
            return run_pipeline(client, photos, demo_options(models, max_steps),
                                download_to=workdir / "outputs", on_event=progress.on_event)


