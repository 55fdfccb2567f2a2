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
adds them through the `fluxlora.cli` entry point group; the client alone has the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from fluxlora_client.caption_cli import caption_app
from fluxlora_client.errors import FluxloraClientError

app = typer.Typer(help="Turn a folder of photos into a tested FLUX.1 LoRA.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
jobs_app = typer.Typer(help="List, inspect, watch and cancel jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(caption_app, name="caption")
console = Console()

Store = Annotated[str | None, typer.Option(help="Artifact store: a directory or s3://bucket (default FLUXLORA_STORE).")]


def _client(store: str | None = None):
    """An SDK client from the environment. `store` is ignored: the client reaches the store only
    through the servers (presigned URLs or gRPC streams), so it needs no store and no S3 keys."""
    from fluxlora_client.client import FluxloraClient

    return FluxloraClient.from_env()


def _run_job(client, label: str, job):
    from fluxlora_client.progress import JobProgress

    with JobProgress() as progress:
        final = client.wait(job, on_event=lambda e: progress.on_event(label, e))
    return client.result(final)


def _print_result(result) -> None:
    console.print_json(json_format.MessageToJson(result))


@app.command()
def preprocess(
    photos: Annotated[Path, typer.Argument(exists=True, help="Folder of photos, or a .zip of them.")],
    base_size: int = 1024,
    crop_mode: Annotated[str, typer.Option(help="bucket, square, subject (square on the subject) or pad.")] = "bucket",
    lora_type: Annotated[str, typer.Option(help="concrete (~30 images) or style (50+).")] = "concrete",
    background: Annotated[str, typer.Option(help="#rrggbb behind transparent pixels (default white).")] = "",
    min_side: Annotated[int, typer.Option(help="Shortest side accepted in px (0: base/4, at least 64).")] = 0,
    blur_threshold: Annotated[float | None, typer.Option(help="Flag images whose blur score is under this.")] = None,
    store: Store = None,
) -> None:
    """Upload photos and preprocess them into a dataset; the report goes to stderr, the result to stdout."""
    client = _client(store)
    source = client.upload_photos(photos)
    job = client.preprocess(source, base_size, crop_mode, lora_type, background=background, min_side=min_side,
                            blur_threshold=blur_threshold)
    result = _run_job(client, "preprocess", job)
    print_dataset_report(result, Console(stderr=True))
    _print_result(result)


def print_dataset_report(result, out: Console) -> None:
    """A PreprocessResult's report as tables: counts, buckets, warnings, and every file with a problem."""
    report = result.report
    counts = Table(title=f"dataset {result.dataset_id}: {report.lora_type} LoRA, {report.crop_mode} "
                         f"{report.base_size} px (about {report.recommended_images} images recommended)")
    for column in ("files", "images", "rejected", "exact duplicates", "near duplicates", "flagged", "blurry",
                   "upscaled"):
        counts.add_column(column, justify="right")
    counts.add_row(*(str(v) for v in (report.file_count, report.image_count, report.rejected_count,
                                       report.duplicate_count, report.near_duplicate_count, report.flagged_count,
                                       report.blurry_count, report.upscaled_count)))
    out.print(counts)
    if report.buckets:
        buckets = Table("bucket", "images", "", title="buckets")
        most = max(report.buckets.values())
        for bucket, n in sorted(report.buckets.items(), key=lambda kv: (-kv[1], kv[0])):
            buckets.add_row(bucket, str(n), "#" * max(1, round(30 * n / most)))
        out.print(buckets)
    sections = [
        ("rejected", ("file", "reason"), [(r.source_key, r.reason) for r in report.rejected]),
        ("exact duplicates (not trained)", ("kept", "copies"),
         [(f"{g.kept_source_key} ({g.stem})", ", ".join(g.duplicate_source_keys)) for g in report.duplicate_groups]),
        ("near duplicates (all trained: keep the best of each group)", ("group", "images", "distance"),
         [(str(i), ", ".join(g.stems), str(g.max_distance)) for i, g in enumerate(report.near_duplicate_groups)]),
        ("flagged", ("image", "flags", "blur score", "first warning"),
         [(f.stem, ", ".join(f.flags), f"{f.blur_score:.1f}", f.warnings[0] if f.warnings else "")
          for f in report.flagged]),
    ]
    for title, columns, rows in sections:
        if rows:
            table = Table(*columns, title=title, title_style="bold", show_lines=False)
            for row in rows:
                table.add_row(*row)
            out.print(table)
    for warning in report.warnings:
        out.print(f"[yellow]warning[/yellow] {warning}")
    if report.truncated:
        out.print(f"(lists cut to 500 entries; {result.report_key} has them all)")
    out.print(f"report {result.report_key}\ncontact sheet {result.contact_sheet_key}")


@app.command()
def train(
    dataset_id: str,
    base_model: Annotated[str, typer.Option(help="Diffusers-layout FLUX.1 directory or store://prefix.")] = "",
    resolution: int = 512,
    max_steps: int = 3000,
    checkpoint_every: int = 750,
    sample_every: int = 750,
    learning_rate: Annotated[float, typer.Option(help="0: the default, 1e-4 (1.0 for prodigy).")] = 0.0,
    rank: int = 16,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations to save memory.")] = True,
    precision: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    caption_version: Annotated[int, typer.Option(help="Approved caption version (0: current captions).")] = 0,
    base_quantization: Annotated[str, typer.Option(help="Base weights in 8 bits: none, fp8 or int8.")] = "none",
    compile_blocks: Annotated[str, typer.Option(help="torch.compile the blocks: auto (on CUDA), on, off.")] = "auto",
    optimizer: Annotated[str, typer.Option(help="adamw, adamw8bit (bitsandbytes, CUDA) or prodigy.")] = "adamw",
    plan: Annotated[bool, typer.Option(help="Only print the memory plan; queue nothing.")] = False,
    target_gib: Annotated[float, typer.Option(help="With --plan: GPU memory to plan for (0: the server's).")] = 0.0,
    store: Store = None,
) -> None:
    """Train a LoRA on a captioned dataset. A run that would not fit the server's GPU is refused
    at once, with the options that would fit; --plan shows that estimate without training."""
    client = _client(store)
    options = dict(resolution=resolution, max_steps=max_steps, checkpoint_every=checkpoint_every,
                   sample_every=sample_every, learning_rate=learning_rate, rank=rank,
                   gradient_checkpointing=gradient_checkpointing, precision=precision,
                   caption_version=caption_version, base_quantization=base_quantization,
                   compile_blocks=compile_blocks, optimizer=optimizer)
    if plan:
        _print_plan(client.plan_training(base_model, target_gib, dataset_id, **options))
        return
    job = client.train(dataset_id, base_model=base_model, **options)
    _print_result(_run_job(client, "train", job))


def _print_plan(plan) -> None:
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    console.print(f"{plan.mode}: {plan.total_gib:.1f} GiB estimated ({plan.step_peak_gib:.1f} step peak, "
                  f"{plan.weights_gib:.1f} weights, {plan.overhead_gib:.1f} overhead): {verdict} "
                  f"in {plan.target_gib:.1f} GiB")
    if plan.alternatives:
        table = Table("options that fit", "GiB", "runnable here")
        for alt in plan.alternatives:
            table.add_row(", ".join(f"{k}={v}" for k, v in sorted(alt.changes.items())), f"{alt.total_gib:.1f}",
                          "yes" if not alt.unavailable else "no: " + "; ".join(alt.unavailable))
        console.print(table)


def _numbers(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


@app.command()
def evaluate(
    run_id: str,
    strengths: Annotated[str, typer.Option(help="Comma-separated LoRA strengths.")] = "0,0.2,0.4,0.6,0.8,1.0",
    checkpoints: Annotated[str, typer.Option(help="Comma-separated checkpoint steps (default: all).")] = "",
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt; repeat for one grid per prompt.")] = None,
    seed: Annotated[str, typer.Option(help="Seed; comma-separated for one grid per seed.")] = "42",
    width: Annotated[int, typer.Option(help="Cell width (default: the run's resolution).")] = 0,
    height: Annotated[int, typer.Option(help="Cell height (default: the run's resolution).")] = 0,
    steps: int = 20,
    rows_per_page: Annotated[int, typer.Option(help="Checkpoint rows per grid image (0: server default).")] = 0,
    image_text_model: Annotated[str, typer.Option(help="CLIP-like model dir for fidelity scores; 'none' skips.")] = "",
    skip_convergence: Annotated[bool, typer.Option(help="Skip the held-out loss per checkpoint.")] = False,
    out: Annotated[Path | None, typer.Option(help="Download the grid images, cells and report here.")] = None,
    store: Store = None,
) -> None:
    """Render an XY grid (checkpoints x LoRA strengths), score it and recommend a checkpoint and strength."""
    client = _client(store)
    job = client.evaluate(
        run_id, strengths=_numbers(strengths), checkpoint_steps=_numbers(checkpoints, int), prompts=prompt or [],
        seeds=_numbers(seed, int), width=width, height=height, steps=steps, rows_per_page=rows_per_page,
        image_text_model=image_text_model, skip_convergence=skip_convergence,
    )
    result = _run_job(client, "evaluate", job)
    _print_result(result)
    pick = result.recommendation
    console.print(f"recommended: step {pick.step} at strength {pick.strength:g} ({pick.basis}): {pick.reason}")
    if out is not None:
        client.download(f"grids/{result.grid_id}/", out)


def _lora(text: str) -> dict:
    """"trn-abc", "trn-abc:1500", "trn-abc:1500@0.8" or "runs/.../file.safetensors@0.8"."""
    ref, _, strength = text.partition("@")
    lora: dict = {"strength": float(strength)} if strength else {}
    if "/" in ref or ref.endswith(".safetensors"):
        return {**lora, "key": ref}
    run_id, _, step = ref.partition(":")
    return {**lora, "run_id": run_id, **({"step": int(step)} if step else {})}


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    lora: Annotated[list[str] | None, typer.Option(
        help="RUN_ID[:STEP][@STRENGTH] or STORE_KEY[@STRENGTH]; repeatable (applied together).")] = None,
    seed: int = 42,
    images: Annotated[int, typer.Option(help="Images per prompt (seeds seed, seed+1, ...).")] = 1,
    width: int = 0,
    height: int = 0,
    steps: int = 20,
    guidance: Annotated[float | None, typer.Option(help="Guidance (default 3.5).")] = None,
    base_model: str = "",
    out: Annotated[Path | None, typer.Option(help="Download the images here.")] = None,
    store: Store = None,
) -> None:
    """Generate images with the base model and LoRAs at chosen strengths."""
    client = _client(store)
    options = {"guidance": guidance} if guidance is not None else {}
    job = client.generate(prompt, loras=[_lora(v) for v in lora or []], seed=seed, images_per_prompt=images,
                          width=width, height=height, steps=steps, base_model=base_model, **options)
    result = _run_job(client, "generate", job)
    _print_result(result)
    if out is not None:
        for image in result.images:
            client.download(image.image_key, out)


@app.command()
def pipeline(
    photos: Annotated[Path | None, typer.Argument(exists=True, help="Folder of photos, or a .zip of them.")] = None,
    trigger: Annotated[str, typer.Option(help="The unique trigger word (needed with PHOTOS).")] = "",
    base_model: str = "",
    caption_model: str = "",
    base_size: int = 1024,
    resolution: int = 512,
    max_steps: int = 3000,
    checkpoint_every: int = 750,
    out: Annotated[Path, typer.Option(help="Where to download the outputs.")] = Path("fluxlora-output"),
    review: Annotated[bool, typer.Option(
        help="Stop after captioning and write OUT/review.html, for a person to review and approve the captions.")]
    = False,
    dataset: Annotated[str, typer.Option(
        help="Continue with this captioned dataset (instead of PHOTOS): train on its approved captions.")] = "",
    store: Store = None,
) -> None:
    """Run preprocess -> caption -> approve -> train -> evaluate on a folder of photos. The cleaned
    auto captions are approved as a caption version ("pipeline") and the run trains on exactly it;
    --review stops for a person to review and approve them first, --dataset then continues."""
    import shlex

    from fluxlora_client.pipeline import PipelineOptions, continue_pipeline, review_steps, run_pipeline
    from fluxlora_client.progress import JobProgress

    if (photos is None) == (not dataset) or (photos is not None and not trigger):
        console.print("[red]error[/red] give PHOTOS with --trigger WORD, or --dataset DATASET_ID to continue "
                      "with an approved dataset")
        raise typer.Exit(2)
    client = _client(store)
    options = PipelineOptions(
        trigger_word=trigger, base_model=base_model, caption_model=caption_model, base_size=base_size,
        train={"resolution": resolution, "max_steps": max_steps, "checkpoint_every": checkpoint_every,
               "sample_every": checkpoint_every},
        review=review,
    )
    with JobProgress() as progress:
        if dataset:
            outputs = continue_pipeline(client, dataset, options, download_to=out, on_event=progress.on_event)
        else:
            outputs = run_pipeline(client, photos, options, download_to=out, on_event=progress.on_event)
    if outputs.stopped_for_review:
        command = ["fluxlora", "pipeline", "--dataset", outputs.dataset_id,
                   *(["--base-model", base_model] if base_model else []), "--resolution", str(resolution),
                   "--max-steps", str(max_steps), "--checkpoint-every", str(checkpoint_every), "--out", str(out),
                   *(["--store", store] if store else [])]
        steps = review_steps(outputs.dataset_id, outputs.caption_version, outputs.review_page, store or "",
                             shlex.join(command))
        console.print(f"dataset {outputs.dataset_id}: caption version {outputs.caption_version} is a draft. "
                      "Review it before training:")
        for step in steps:
            console.print(f"  {step}", markup=False, soft_wrap=True)  # whole lines, to copy
        return
    print_outputs(outputs)


def print_outputs(outputs) -> None:
    table = Table(title="fluxlora outputs")
    table.add_column("what")
    table.add_column("where")
    local = outputs.local
    train = outputs.results["train"]
    captions = outputs.captions
    rows = [
        ("dataset id", outputs.dataset_id),
        ("captions trained on", f"version {outputs.caption_version}" + (
            f", approved by {captions.author or 'someone'}" + (f" ({captions.comment})" if captions.comment else "")
            if captions is not None else "")),
        ("processed images + captions", str(local.get("dataset", "")) + "/images"),
        ("manifest", str(local.get("dataset", "")) + "/manifest.json"),
        ("run id", outputs.run_id),
        ("LoRA checkpoints", ", ".join(f"step {c.step}" for c in train.checkpoints)),
        ("checkpoint files", str(local.get("run", "")) + "/checkpoints"),
        ("loss plot", str(local.get("run", "")) + "/loss.png"),
        ("validation samples", str(local.get("run", "")) + "/samples"),
        ("XY grid", str(local.get("grid", "")) + "/grid.png"),
        ("final loss / s per step", f"{train.final_loss:.4f} / {train.seconds_per_step:.3f}"),
    ]
    grid = outputs.results.get("evaluate")
    if grid is not None and grid.HasField("recommendation"):
        pick = grid.recommendation
        rows.append(("recommended", f"step {pick.step} at strength {pick.strength:.1f} ({pick.basis}): {pick.reason}"))
    for what, where in rows:
        table.add_row(what, where)
    console.print(table)


@jobs_app.command("list")
def jobs_list(
    service: str,
    limit: Annotated[int, typer.Option(min=0, help="Show the newest this many jobs; 0: every job.")] = 100,
    store: Store = None,
) -> None:
    """List a service's jobs, newest first."""
    from fluxlora_api.v1 import jobs_pb2

    table = Table("job", "state", "stage", "progress", "created")
    for job in _client(store).list_jobs(service, limit=limit):
        table.add_row(
            job.job_id, jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"), job.progress.stage,
            f"{job.progress.done}/{job.progress.total}", job.created_at.ToJsonString(),
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, store: Store = None) -> None:
    """Print one job as JSON."""
    console.print_json(json_format.MessageToJson(_client(store).get_job(job_id)))


@jobs_app.command("watch")
def jobs_watch(job_id: str, store: Store = None) -> None:
    """Follow a job until it finishes."""
    client = _client(store)
    _print_result(_run_job(client, job_id.split("-")[0], client.get_job(job_id)))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, store: Store = None) -> None:
    """Ask a job to stop."""
    job = _client(store).cancel(job_id)
    console.print(json.dumps({"job_id": job.job_id, "cancel_requested": job.cancel_requested}))


def _add_plugins(target: typer.Typer) -> None:
    """Commands other installed distributions add (the server's: serve, worker, up, demo, models)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="fluxlora.cli"):
        entry.load()(target)


_add_plugins(app)


def main() -> None:
    from rich.markup import escape

    from fluxlora_api.shared.errors import FluxloraError

    try:
        app()
    except (FluxloraClientError, FluxloraError) as err:
        # FluxloraError: the store itself (misconfigured, unreachable) fails before any RPC.
        # Messages name user files, which may hold "[...]": never read them as rich markup.
        console.print(f"[red]error[/red] {err.code}: {escape(err.message)}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
