"""The pipeline's stages as commands, one at a time (preprocess, train, evaluate, generate) and all in a
row (pipeline). Each waits for its job with a progress line and prints the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fluxlora_api.shared.options import help_text
from fluxlora_api.v1 import evaluation_pb2, preprocessing_pb2, training_pb2
from fluxlora_api.v1.field_docs import COMMENTS
from fluxlora_client.cli_reports import outputs_json, print_dataset_report, print_outputs, print_plan
from fluxlora_client.cli_support import JsonOutput, _client, _print_result, _run_job, busy, console, err_console
from fluxlora_client.spec_options import SpecCommand, spec_options


def add_stage_commands(app: typer.Typer) -> None:
    """The commands in the order `fluxlora --help` lists them."""
    for command in (preprocess, train, evaluate, generate):
        app.command(cls=SpecCommand)(command)
    app.command()(pipeline)


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
            print_plan(found)
        return
    with busy("checking the run fits the GPU"):
        if resume:
            job = client.resume_training(resume, **({"dataset_id": dataset_id} if dataset_id else {}), **options)
        else:
            job = client.train(dataset_id, **options)
    _print_result(_run_job(client, "train", job), json_output, counted=frozenset({"sample_keys"}))


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
        print_outputs(outputs, console)
