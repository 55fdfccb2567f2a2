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

from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape

from fluxlora_api.shared.options import help_text
from fluxlora_api.v1 import evaluation_pb2, preprocessing_pb2, training_pb2
from fluxlora_api.v1.field_docs import COMMENTS
from fluxlora_client.caption_cli import caption_app
from fluxlora_client.cli_support import (
    JsonOutput,
    _client,
    _print_result,
    _run_job,
    busy,
    console,
    err_console,
    table,
)
from fluxlora_client.errors import FluxloraClientError
from fluxlora_client.spec_options import SpecCommand, spec_options

app = typer.Typer(help="Turn a folder of photos into a tested FLUX.1 LoRA.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
jobs_app = typer.Typer(help="List, inspect, watch and cancel jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(caption_app, name="caption")


@app.command(cls=SpecCommand)
@spec_options(preprocessing_pb2.PreprocessSpec, exclude={"source_prefix"})
def preprocess(
    photos: Annotated[Path, typer.Argument(exists=True, help="Folder of photos, or a .zip of them.")],
    json_output: JsonOutput = False,
    spec: dict | None = None,
) -> None:
    """Upload photos and preprocess them into a dataset, then print its report as tables (--json:
    the result as JSON). Options left out take the server's defaults."""
    client = _client()
    with busy(f"uploading {photos}"):
        source = client.upload_photos(photos)
    job = client.preprocess(source, **(spec or {}))
    warned: list[str] = []
    result = _run_job(client, "preprocess", job, warnings=warned)
    if json_output:
        _print_result(result)
    else:
        print_dataset_report(result, console, shown_warnings=warned)


def print_dataset_report(result, out: Console, shown_warnings: list[str] | tuple[str, ...] = ()) -> None:
    """A PreprocessResult's report as tables: counts, buckets, warnings (but those already shown), and
    every file with a problem."""
    report = result.report
    out.print(f"dataset {result.dataset_id}: {report.lora_type} LoRA, {report.crop_mode} {report.base_size} px "
              f"(about {report.recommended_images} images recommended)", highlight=False, soft_wrap=True)
    counts = table("files", "images", "rejected", "exact dupes", "near dupes", "flagged", "blurry", "upscaled")
    counts.add_row(*(str(v) for v in (report.file_count, report.image_count, report.rejected_count,
                                       report.duplicate_count, report.near_duplicate_count, report.flagged_count,
                                       report.blurry_count, report.upscaled_count)))
    out.print(counts)
    if report.buckets:
        buckets = table("bucket", "images", "", title="buckets")
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
            section = table(*columns, title=title, title_style="bold", show_lines=False)
            for row in rows:
                section.add_row(*(escape(cell) for cell in row))
            out.print(section)
    for warning in report.warnings:
        if warning not in shown_warnings:
            out.print(f"[yellow]warning[/yellow] {escape(warning)}", highlight=False)
    if report.truncated:
        out.print(f"(lists cut to 500 entries; {result.report_key} has them all)")
    out.print(f"report {result.report_key}\ncontact sheet {result.contact_sheet_key}", soft_wrap=True,
              highlight=False)


@app.command(cls=SpecCommand)
@spec_options(training_pb2.TrainSpec, exclude={"dataset_id"}, aliases={"resume_from_run": ["--resume-from"]})
def train(
    dataset_id: Annotated[str, typer.Argument(
        help=help_text(COMMENTS["fluxlora.v1.TrainSpec"]["dataset_id"]) + " Not with --resume-from: the run "
        "knows its dataset.", show_default=False)] = "",
    plan: Annotated[bool, typer.Option(help="Only print the memory plan; queue nothing.")] = False,
    target_gib: Annotated[float, typer.Option(
        help="With --plan: " + help_text(COMMENTS["fluxlora.v1.PlanTrainingRequest"]["target_gib"]))] = 0.0,
    json_output: JsonOutput = False,
    spec: dict | None = None,
) -> None:
    """Train a LoRA on a captioned dataset. Options left out take the server's defaults. A run that
    would not fit the server's GPU is refused at once, with the options that would fit; --plan
    shows that estimate without training. `fluxlora train --resume-from trn-... [--max-steps N]`
    continues a failed or cancelled run from its last checkpoint, with that run's dataset and options."""
    options = spec or {}
    resume = options.pop("resume_from_run", "")
    if not dataset_id and not resume:
        raise typer.BadParameter("give the DATASET_ID to train on, or --resume-from RUN_ID to continue a run",
                                 param_hint="'DATASET_ID'")
    client = _client()
    if plan:
        if resume:
            raise typer.BadParameter("--plan plans a new run: leave out --resume-from", param_hint="'--plan'")
        with busy("estimating peak GPU memory (a model's first estimate takes up to a minute)"):
            found = client.plan_training(target_gib=target_gib, dataset_id=dataset_id, **options)
        if json_output:
            _print_result(found)
        else:
            _print_plan(found)
        return
    with busy("checking the run fits the GPU"):
        if resume:
            job = client.resume_training(resume, **({"dataset_id": dataset_id} if dataset_id else {}), **options)
        else:
            job = client.train(dataset_id, **options)
    _print_result(_run_job(client, "train", job), json_output, counted=frozenset({"sample_keys"}))


def plan_flags(changes: dict[str, str]) -> list[str]:
    """A plan alternative's changes as `fluxlora train` flags: {"gradient_checkpointing": "true",
    "blocks_to_swap": "12"} -> ["--blocks-to-swap 12", "--gradient-checkpointing"]."""
    fields = training_pb2.TrainSpec.DESCRIPTOR.fields_by_name
    flags = []
    for name, value in sorted(changes.items()):
        flag = "--" + name.replace("_", "-")
        if name in fields and fields[name].cpp_type == fields[name].CPPTYPE_BOOL:
            flags.append(flag if str(value).lower() == "true" else f"--no-{flag[2:]}")
        else:
            flags.append(f"{flag} {value}")
    return flags


def _print_plan(plan) -> None:
    if plan.memory_choice:
        console.print(escape(plan.memory_choice), highlight=False)
        console.print("  as flags: " + " ".join(plan_flags(dict(plan.picked))), highlight=False, soft_wrap=True)
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    console.print(f"{plan.mode}: {plan.total_gib:.1f} GiB estimated ({plan.step_peak_gib:.1f} step peak, "
                  f"{plan.weights_gib:.1f} weights, {plan.overhead_gib:.1f} overhead): {verdict} "
                  f"in {plan.target_gib:.1f} GiB" + (f" ({escape(plan.target_source)})" if plan.target_source else ""))
    if plan.cluster_queue:
        flavors = table("flavor", "GPU", "GiB", "GPU quota", "fits",
                        title=f"ClusterQueue {plan.cluster_queue}: where Kueue may admit the run")
        for f in plan.flavors:
            flavors.add_row(escape(f.name), escape(f.gpu_product or "?"),
                            f"{f.gpu_memory_gib:g}" if f.gpu_memory_gib else "unknown", str(f.gpu_quota),
                            "[green]yes[/green]" if f.fits else "[red]no[/red]")
        console.print(flavors)
    if plan.alternatives:
        options = table("options that fit", "GiB", "runnable here", title="fluxlora train options that fit")
        for alt in plan.alternatives:
            options.add_row(" ".join(plan_flags(dict(alt.changes))), f"{alt.total_gib:.1f}",
                            "yes" if not alt.unavailable else "no: " + escape("; ".join(alt.unavailable)))
        console.print(options)


def _lora_ref(text: str, flag: str) -> dict:
    """"trn-abc", "trn-abc:1500" or a store key ("runs/.../file.safetensors"), as LoRA fields."""
    if not text:
        raise typer.BadParameter("empty LoRA", param_hint=f"'{flag}'")
    if "/" in text or text.endswith(".safetensors"):
        return {"key": text}
    run_id, _, step = text.partition(":")
    if step and not step.isdigit():
        raise typer.BadParameter(f"{text!r}: STEP must be a whole number, as in trn-0123456789ab:1500",
                                 param_hint=f"'{flag}'")
    return {"run_id": run_id, **({"step": int(step)} if step else {})}


def _lora(text: str) -> dict:
    """"trn-abc", "trn-abc:1500", "trn-abc:1500@0.8" or "runs/.../file.safetensors@0.8"."""
    ref, at, strength = text.partition("@")
    lora = _lora_ref(ref, "--lora")
    if at:
        try:
            lora["strength"] = float(strength)
        except ValueError:
            raise typer.BadParameter(f"{text!r}: STRENGTH must be a number, as in trn-0123456789ab:1500@0.8",
                                     param_hint="'--lora'") from None
    return lora


def _grid_lora(text: str) -> dict:
    """"trn-abc:1500=v1" or "runs/.../file.safetensors=v1": a grid row and its label."""
    ref, _, label = text.partition("=")
    return {**_lora_ref(ref, "--lora"), **({"label": label} if label else {})}


@app.command(cls=SpecCommand)
@spec_options(evaluation_pb2.GridSpec, exclude={"run_id", "loras"},
              aliases={"checkpoint_steps": ["--checkpoints"]})
def evaluate(
    run_id: Annotated[str, typer.Argument(help="The training run whose checkpoints form the rows ('' with --lora).")],
    lora: Annotated[list[str] | None, typer.Option(
        help="Rows from LoRA files instead: RUN_ID[:STEP][=LABEL] or STORE_KEY[=LABEL]; repeatable.")] = None,
    out: Annotated[Path | None, typer.Option(help="Download the grid images, cells and report here.")] = None,
    json_output: JsonOutput = False,
    spec: dict | None = None,
) -> None:
    """Render an XY grid (checkpoints x LoRA strengths), score it and recommend a checkpoint and
    strength. Options left out take the server's defaults (--strengths 0,0.5,1 for other columns)."""
    options = spec or {}
    loras = [_grid_lora(v) for v in lora or []]
    client = _client()
    job = client.evaluate(run_id, **options, **({"loras": loras} if loras else {}))
    result = _run_job(client, "evaluate", job)
    if out is not None:
        with busy(f"downloading the grid to {out}"):
            client.download(f"grids/{result.grid_id}/", out)
    _print_result(result, json_output, counted=frozenset({"cells", "panels", "checkpoints"}))
    if not json_output:
        pick = result.recommendation
        console.print(f"recommended: step {pick.step} at strength {pick.strength:g} ({pick.basis}): "
                      f"{escape(pick.reason)}", highlight=False)


@app.command(cls=SpecCommand)
@spec_options(evaluation_pb2.GenerateSpec, exclude={"prompts", "loras"},
              aliases={"images_per_prompt": ["--images"]})
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    lora: Annotated[list[str] | None, typer.Option(
        help="RUN_ID[:STEP][@STRENGTH] or STORE_KEY[@STRENGTH]; repeatable (applied together).")] = None,
    out: Annotated[Path | None, typer.Option(help="Download the images here.")] = None,
    json_output: JsonOutput = False,
    spec: dict | None = None,
) -> None:
    """Generate images with the base model and LoRAs at chosen strengths. Options left out take the
    server's defaults."""
    loras = [_lora(v) for v in lora or []]
    client = _client()
    job = client.generate(prompt, loras=loras, **(spec or {}))
    result = _run_job(client, "generate", job)
    if out is not None:
        with busy(f"downloading the images to {out}"):
            for image in result.images:
                client.download(image.image_key, out)
    _print_result(result, json_output)


@app.command()
def pipeline(
    photos: Annotated[Path | None, typer.Argument(exists=True, help="Folder of photos, or a .zip of them.")] = None,
    trigger: Annotated[str, typer.Option(help="The unique trigger word (needed with PHOTOS).")] = "",
    base_model: Annotated[str, typer.Option(help="Base model directory or store://prefix (default: the server's).")]
    = "",
    caption_model: Annotated[str, typer.Option(help="Captioning model (default: the server's).")] = "",
    base_size: Annotated[int | None, typer.Option(help=help_text(COMMENTS["fluxlora.v1.PreprocessSpec"]["base_size"]))]
    = None,
    resolution: Annotated[int | None, typer.Option(help=help_text(COMMENTS["fluxlora.v1.TrainSpec"]["resolution"]))]
    = None,
    max_steps: Annotated[int | None, typer.Option(help=help_text(COMMENTS["fluxlora.v1.TrainSpec"]["max_steps"]))]
    = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        help="Checkpoint (and sample) every N steps; default: the server's (750).")] = None,
    out: Annotated[Path, typer.Option(help="Where to download the outputs.")] = Path("fluxlora-output"),
    review: Annotated[bool, typer.Option(
        help="Stop after captioning and write OUT/review.html, for a person to review and approve the captions.")]
    = False,
    dataset: Annotated[str, typer.Option(
        help="Continue with this captioned dataset (instead of PHOTOS): train on its approved captions.")] = "",
    json_output: JsonOutput = False,
) -> None:
    """Run preprocess -> caption -> approve -> train -> evaluate on a folder of photos. The cleaned
    auto captions are approved as a caption version ("pipeline") and the run trains on exactly it;
    --review stops for a person to review and approve them first, --dataset then continues."""
    import shlex

    from fluxlora_client.pipeline import PipelineOptions, continue_pipeline, review_steps, run_pipeline
    from fluxlora_client.progress import JobProgress

    if (photos is None) == (not dataset) or (photos is not None and not trigger):
        err_console.print("[red]error[/red] give PHOTOS with --trigger WORD, or --dataset DATASET_ID to continue "
                          "with an approved dataset")
        raise typer.Exit(2)
    client = _client()
    train = {k: v for k, v in {"resolution": resolution, "max_steps": max_steps, "checkpoint_every": checkpoint_every,
                               "sample_every": checkpoint_every}.items() if v is not None}
    options = PipelineOptions(trigger_word=trigger, base_model=base_model, caption_model=caption_model,
                              base_size=base_size or 0, train=train, review=review)
    with JobProgress() as progress:
        if dataset:
            outputs = continue_pipeline(client, dataset, options, download_to=out, on_event=progress.on_event)
        else:
            outputs = run_pipeline(client, photos, options, download_to=out, on_event=progress.on_event)
    if outputs.stopped_for_review:
        given_options = {"--base-model": base_model or None, "--resolution": resolution, "--max-steps": max_steps,
                         "--checkpoint-every": checkpoint_every}
        command = ["fluxlora", "pipeline", "--dataset", outputs.dataset_id,
                   *[part for flag, v in given_options.items() if v is not None for part in (flag, str(v))],
                   "--out", str(out)]
        steps = review_steps(outputs.dataset_id, outputs.caption_version, outputs.review_page,
                             continue_command=shlex.join(command))
        console.print(f"dataset {outputs.dataset_id}: caption version {outputs.caption_version} is a draft. "
                      "Review it before training:")
        for step in steps:
            console.print(f"  {step}", markup=False, soft_wrap=True)  # whole lines, to copy
        return
    if json_output:
        console.print_json(data=outputs_json(outputs))
    else:
        print_outputs(outputs)


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def outputs_json(outputs) -> dict:
    """The pipeline's outputs in the JSON casing of every command (camelCase)."""
    grid = outputs.results.get("evaluate")
    return {
        "datasetId": outputs.dataset_id, "captionVersion": outputs.caption_version, "runId": outputs.run_id,
        "gridId": outputs.grid_id, "local": {_camel(k): str(v) for k, v in outputs.local.items()},
        "train": json_format.MessageToDict(outputs.results["train"]),
        **({"recommendation": json_format.MessageToDict(grid.recommendation)}
           if grid is not None and grid.HasField("recommendation") else {}),
    }


def _shown_path(path: Path | str) -> str:
    """A local path as short as it can be and still be copied: relative to the working directory
    when under it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def print_outputs(outputs) -> None:
    """Where the pipeline's outputs are: one row each, paths whole (a long one wraps, never cut)."""
    local = {name: _shown_path(path) for name, path in outputs.local.items()}
    train = outputs.results["train"]
    captions = outputs.captions
    rows = [
        ("dataset id", outputs.dataset_id),
        ("captions trained on", f"version {outputs.caption_version}" + (
            f", approved by {captions.author or 'someone'}" + (f" ({captions.comment})" if captions.comment else "")
            if captions is not None else "")),
        ("processed images + captions", local.get("dataset", "") + "/images"),
        ("manifest", local.get("dataset", "") + "/manifest.json"),
        *([("contact sheet", local["contact_sheet"])] if "contact_sheet" in local else []),
        ("run id", outputs.run_id),
        ("LoRA checkpoints", ", ".join(f"step {c.step}" for c in train.checkpoints)),
        ("checkpoint files", local.get("run", "") + "/checkpoints"),
        ("loss plot", local.get("run", "") + "/loss.png"),
        ("validation samples", local.get("run", "") + "/samples"),
        ("XY grid", local.get("grid", "") + "/grid.png"),
        ("final loss / s per step", f"{train.final_loss:.4f} / {train.seconds_per_step:.3f}"),
    ]
    grid = outputs.results.get("evaluate")
    if grid is not None and grid.HasField("recommendation"):
        pick = grid.recommendation
        rows.append(("recommended", f"step {pick.step} at strength {pick.strength:.1f} ({pick.basis}): {pick.reason}"))
    outputs_table = table("what", "where", title="fluxlora outputs")
    for what, where in rows:
        outputs_table.add_row(what, escape(where))
    console.print(outputs_table)


@jobs_app.command("list")
def jobs_list(
    service: str,
    limit: Annotated[int, typer.Option(min=0, help="Show the newest this many jobs; 0: every job.")] = 100,
    json_output: JsonOutput = False,
) -> None:
    """List a service's jobs, newest first."""
    from fluxlora_api.v1 import jobs_pb2

    jobs = _client().list_jobs(service, limit=limit)
    if json_output:
        console.print_json(data={"jobs": [json_format.MessageToDict(job) for job in jobs]})
        return
    if not jobs:
        console.print(f"no {escape(service)} jobs")
        return
    listed = table("job", "state", "stage", "progress", "created")
    for job in jobs:
        listed.add_row(
            job.job_id, jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"), escape(job.progress.stage),
            f"{job.progress.done}/{job.progress.total}", job.created_at.ToJsonString().replace("T", " "),
        )
    console.print(listed)


@jobs_app.command("show")
def jobs_show(job_id: str) -> None:
    """Print one job as JSON."""
    console.print_json(json_format.MessageToJson(_client().get_job(job_id)))


@jobs_app.command("watch")
def jobs_watch(job_id: str, json_output: JsonOutput = False) -> None:
    """Follow a job until it finishes, riding out a restart of its server (up to 5 minutes)."""
    client = _client()
    _print_result(_run_job(client, job_id.split("-")[0], job_id), json_output)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, json_output: JsonOutput = False) -> None:
    """Ask a job to stop; it stops within seconds at any stage (a training run checkpoints first)."""
    job = _client().cancel(job_id)
    if json_output:
        console.print_json(data={"jobId": job.job_id, "cancelRequested": job.cancel_requested})
    else:
        console.print(f"{job.job_id}: cancel requested" if job.cancel_requested else f"{job.job_id}: already finished",
                      highlight=False)


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
