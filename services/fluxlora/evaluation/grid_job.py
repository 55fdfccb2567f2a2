"""Runs one grid job: a run's checkpoints (or a list of LoRA files) x strengths (x prompts x seeds)
rendered on the process's cached base pipeline, scored, and written to the store as cells,
labelled pages and report.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from statistics import fmean

from google.protobuf import json_format
from PIL import Image

from fluxlora.common import keys
from fluxlora.common.models import resolve_model
from fluxlora.domain.datasets import stored_controls
from fluxlora.domain.runs import select_checkpoints
from fluxlora.evaluation import heldout, scoring
from fluxlora.evaluation.grid import compose_grid, format_step, format_strength, page_rows
from fluxlora.evaluation.image_text import IMAGE_TEXT_MODELS, fidelity, flexibility
from fluxlora.evaluation.job_support import (
    IMAGE_SUFFIXES,
    control_image,
    device_and_dtype,
    inference_loading,
    settings_of,
)
from fluxlora.evaluation.pipelines import base_pipeline
from fluxlora.evaluation.render import Panel, render_panels
from fluxlora.evaluation.validation import NO_MODEL
from fluxlora.jobs.context import JobContext
from fluxlora.models.base_model import resolve_base_model
from fluxlora_api.v1 import evaluation_pb2 as pb

MAX_REFERENCE_IMAGES = 32  # training images the fidelity score compares cells with


@dataclasses.dataclass
class Dataset:
    """The run's training images that scoring uses, by stem: (image, caption)."""

    images: dict[str, tuple[Image.Image, str]]
    probe: list[str]  # stems for the convergence probe; [] when skipped
    references: list[str]  # stems fidelity compares cells with; [] without an image-text model
    controls: dict[str, Image.Image] = dataclasses.field(default_factory=dict)  # probe stems' control images


@dataclasses.dataclass
class Scores:
    """Everything measured, indexed [row] or [panel][row][col]."""

    losses: list[float] | None = None
    base_loss: float | None = None
    convergence: scoring.Convergence | None = None
    fidelity: list[list[list[float]]] | None = None
    flexibility: list[list[list[float]]] | None = None
    texts: list[str] | None = None


@dataclasses.dataclass
class Row:
    """One row of the grid: a LoRA file, its label and its training step (0 when unknown)."""

    label: str
    step: int
    key: str


def grid_rows(ctx: JobContext, spec: pb.GridSpec) -> tuple[list[Row], dict]:
    """The rows (a run's checkpoints, or spec.loras as validated) and the run giving defaults ({} if none)."""
    if not spec.loras:
        checkpoints = select_checkpoints(ctx.store, spec.run_id, list(spec.checkpoint_steps))
        rows = [Row(format_step(step), step, key) for step, key in checkpoints.items()]
        return rows, ctx.store.get_json(keys.run_info(spec.run_id))
    run_id = next((lora.run_id for lora in spec.loras if lora.run_id), "")
    run = ctx.store.get_json(keys.run_info(run_id)) if run_id else {}
    return [Row(lora.label, lora.step, lora.key) for lora in spec.loras], run


def run_grid(ctx: JobContext, spec: pb.GridSpec) -> pb.GridResult:
    settings = settings_of(ctx)
    rows, run = grid_rows(ctx, spec)
    steps, strengths = [row.step for row in rows], list(spec.strengths)
    panels = [Panel(prompt, seed) for prompt in spec.prompts for seed in spec.seeds]
    loras = []
    for r, row in enumerate(rows):
        ctx.check_cancelled()
        local = ctx.scratch / "loras" / f"row-{r:03d}.safetensors"
        loras.append((row.label, ctx.store.get_file(row.key, local)))
    dataset = _dataset_images(ctx, run, spec)
    control = control_image(ctx, spec.control_image)
    ctx.progress("loading base model", 0)
    model_dir = resolve_base_model(spec.base_model, spec.base_components, ctx.store, settings.cache_dir,
                                   spec.family)
    device, dtype = device_and_dtype(settings)
    loading = inference_loading(settings, device)
    config = run.get("config", {})
    scores = Scores()

    with base_pipeline(model_dir, device, dtype, loading.quantization, loading.cpu_offload, spec.family) as pipe:
        probe = None
        if dataset.probe:
            ctx.progress("convergence probe", 0)
            probe = heldout.prepare_probe(
                pipe, [dataset.images[s] for s in dataset.probe], config.get("resolution", spec.width),
                guidance=spec.guidance, max_sequence_length=config.get("max_sequence_length", 512),
                controls=[dataset.controls.get(s) for s in dataset.probe],
            )
            scores.base_loss = heldout.probe_loss(pipe, probe)
        losses: dict[int, float] = {}

        def on_lora(row: int) -> None:
            ctx.check_cancelled()
            losses[row] = heldout.probe_loss(pipe, probe)

        cells = render_panels(
            pipe, loras, strengths, panels, spec.width, spec.height, spec.steps, spec.guidance,
            progress=lambda done, total: (ctx.check_cancelled(), ctx.progress("rendering cells", done, total, "cell")),
            on_lora=on_lora if probe is not None else None, control=control,
        )
    if probe is not None:
        scores.losses = [losses[r] for r in range(len(steps))]
    if probe is not None and not spec.loras:  # LoRA files have no training order to converge along
        scores.convergence = scoring.convergence(steps, scores.losses, scores.base_loss)
        if not scores.convergence.improved:
            ctx.warn(f"no checkpoint beats the base model's held-out loss ({scores.base_loss:.4f}): "
                     "the LoRA may not have learned the dataset")
    _image_text_scores(ctx, spec, run, dataset, panels, cells, scores, device)

    recommendation = scoring.recommend(
        steps, strengths,
        converged_step=scores.convergence.step if scores.convergence else None,
        fidelity=_mean_over_panels(scores.fidelity), flexibility=_mean_over_panels(scores.flexibility),
    )
    return _write(ctx, spec, rows, panels, cells, scores, recommendation, dataset, control)


def _dataset_images(ctx: JobContext, run: dict, spec: pb.GridSpec) -> Dataset:
    """The training images scoring needs; none when nothing needs them or the dataset is gone
    (scoring then does without, with a warning)."""
    wants_text = spec.image_text_model not in ("", NO_MODEL)
    if spec.skip_convergence and not wants_text:
        return Dataset({}, [], [])
    prefix = keys.dataset_images(run.get("dataset_id", ""))
    objects = {o.key[len(prefix):]: o.key for o in ctx.store.list(prefix)} if run.get("dataset_id") else {}
    names = {Path(name).stem: name for name in sorted(objects) if Path(name).suffix.lower() in IMAGE_SUFFIXES}
    if not names:
        if not run:
            ctx.warn("no LoRA in spec.loras names a training run, so there is no dataset: image-text scores "
                     "are skipped")
            return Dataset({}, [], [])
        ctx.warn(f"run {run.get('run_id', '')} has no training images in the store ({prefix}): grid scores are skipped")
        return Dataset({}, [], [])
    probe = [] if spec.skip_convergence else scoring.probe_subset(list(names), heldout.MAX_IMAGES)
    references = scoring.probe_subset(list(names), MAX_REFERENCE_IMAGES) if wants_text else []
    images = {}
    for stem in sorted({*probe, *references}):
        path = ctx.store.get_file(objects[names[stem]], ctx.scratch / "dataset" / names[stem])
        caption_name = stem + ".txt"
        caption = ctx.store.get_bytes(objects[caption_name]).decode("utf-8").strip() if caption_name in objects else ""
        with Image.open(path) as opened:
            images[stem] = (opened.convert("RGB"), caption)
    return Dataset(images, probe, references, _control_images(ctx, run["dataset_id"], probe))


def _control_images(ctx: JobContext, dataset_id: str, stems: list[str]) -> dict[str, Image.Image]:
    """The control (before) images of `stems` in an editing dataset, by stem; {} for a dataset without
    them. The probe of an editing LoRA edits them, as training did."""
    if not stems:
        return {}
    by_stem = {Path(name).stem: key for name, key in stored_controls(ctx.store, dataset_id).items()
               if Path(name).suffix.lower() in IMAGE_SUFFIXES}
    controls = {}
    for stem in stems:
        if stem in by_stem:
            path = ctx.store.get_file(by_stem[stem], ctx.scratch / "dataset" / "control" / Path(by_stem[stem]).name)
            with Image.open(path) as opened:
                controls[stem] = opened.convert("RGB")
    return controls


def _image_text_scores(ctx, spec, run, dataset: Dataset, panels, cells, scores: Scores, device) -> None:
    if not dataset.references:
        return
    ctx.progress("scoring cells", 0)
    model_dir = resolve_model(spec.image_text_model, ctx.store, settings_of(ctx).cache_dir, "image-text model")
    references = [dataset.images[s][0] for s in dataset.references]
    scores.texts = [scoring.strip_trigger(p.prompt, run.get("trigger_word", "")) for p in panels]
    if any(not text for text in scores.texts):
        ctx.warn("a prompt holds nothing but the trigger word: its flexibility compares cells with an empty prompt")
    with IMAGE_TEXT_MODELS.borrow((str(model_dir), str(device)), model_dir, device) as model:
        reference_embeddings = model.embed_images(references)
        text_embeddings = model.embed_texts(scores.texts)
        scores.fidelity, scores.flexibility = [], []
        for p, panel_cells in enumerate(cells):
            ctx.check_cancelled()
            flat = [cell for row in panel_cells for cell in row]
            embeddings = model.embed_images(flat)
            fid, flex = fidelity(embeddings, reference_embeddings), flexibility(embeddings, text_embeddings[p])
            cols = len(panel_cells[0])
            scores.fidelity.append([fid[r * cols:(r + 1) * cols] for r in range(len(panel_cells))])
            scores.flexibility.append([flex[r * cols:(r + 1) * cols] for r in range(len(panel_cells))])


def _mean_over_panels(tables: list[list[list[float]]] | None) -> list[list[float]] | None:
    if tables is None:
        return None
    return [[fmean(t[r][c] for t in tables) for c in range(len(tables[0][0]))] for r in range(len(tables[0]))]


def _write(ctx, spec, grid_rows: list[Row], panels, cells, scores: Scores, recommendation: scoring.Recommendation,
           dataset: Dataset, control: Image.Image | None = None) -> pb.GridResult:
    grid_id = ctx.job_id
    prefix = keys.grid_prefix(grid_id)
    steps, strengths = [row.step for row in grid_rows], list(spec.strengths)
    rows, cols = len(steps), len(strengths)
    result = pb.GridResult(grid_id=grid_id, rows=rows, cols=cols)
    result.recommendation.CopyFrom(pb.Recommendation(
        step=recommendation.step, strength=recommendation.strength, row=recommendation.row,
        col=recommendation.col, basis=recommendation.basis, reason=recommendation.reason,
        label=grid_rows[recommendation.row].label,
    ))
    if scores.convergence:
        result.recommendation.converged_step = scores.convergence.step
    if scores.base_loss is not None:
        result.base_heldout_loss = scores.base_loss

    ctx.progress("writing grid", 0)
    cells_dir = ctx.scratch / "cells"
    for p in range(len(panels)):
        sub = f"grid-{p + 1:02d}/" if len(panels) > 1 else ""
        (cells_dir / sub).mkdir(parents=True, exist_ok=True)
        for r, step in enumerate(steps):
            for c, strength in enumerate(strengths):
                row_name = f"row-{r + 1:02d}" if spec.loras else f"step-{step:06d}"
                name = f"{sub}{row_name}_strength-{format_strength(strength)}.png"
                cells[p][r][c].save(cells_dir / name)
                key = prefix + "cells/" + name
                ctx.upload(cells_dir / name, key, "grid-cell", step)
                cell = pb.GridCell(row=r, col=c, step=step, strength=strength, image_key=key, panel=p)
                if scores.fidelity is not None:
                    cell.scores.fidelity = scores.fidelity[p][r][c]
                    cell.scores.flexibility = scores.flexibility[p][r][c]
                    cell.scores.score = recommendation.scores[r][c]
                result.cells.append(cell)

    for r, row in enumerate(grid_rows):
        score = pb.CheckpointScore(step=row.step, lora_key=row.key, label=row.label)
        if scores.losses is not None:
            score.heldout_loss = scores.losses[r]
        if scores.fidelity is not None:
            positive = [c for c, s in enumerate(strengths) if s > 0] or list(range(cols))
            score.fidelity = fmean(t[r][c] for t in scores.fidelity for c in positive)
            score.flexibility = fmean(t[r][c] for t in scores.flexibility for c in positive)
        result.checkpoints.append(score)

    pages_report = _write_pages(ctx, spec, panels, cells, grid_rows, strengths, recommendation, result, control)
    result.grid_key = result.panels[0].page_keys[0]
    result.report_key = prefix + "report.json"
    report_info = ctx.store.put_json(result.report_key, {
        "grid_id": grid_id,
        "spec": json_format.MessageToDict(spec),
        "rule": scoring.RULE,
        "recommendation": json_format.MessageToDict(result.recommendation),
        "convergence": None if scores.convergence is None else {
            "method": "flow-matching loss on the run's images at fixed noise levels and fixed noise per image",
            "images": dataset.probe,
            "control_images": sorted(dataset.controls),  # editing runs: the probe edits these stems' controls
            "sigmas": list(heldout.SIGMAS),
            "noise_seed": heldout.NOISE_SEED,
            "tolerance": scoring.CONVERGENCE_TOLERANCE,
            "base_loss": scores.base_loss,
            "losses": dict(zip(map(str, steps), scores.losses, strict=True)),
            "converged_step": scores.convergence.step,
            "improved": scores.convergence.improved,
        },
        "image_text": None if scores.fidelity is None else {
            "model": spec.image_text_model,
            "reference_images": dataset.references,
            "flexibility_texts": scores.texts,
            "flexibility_weight": scoring.FLEXIBILITY_WEIGHT,
        },
        "checkpoints": [json_format.MessageToDict(c) for c in result.checkpoints],
        "cells": [json_format.MessageToDict(c) for c in result.cells],
        "panels": pages_report,
        # The first page's geometry, where a single-page grid's cells sit.
        "layout": pages_report[0]["pages"][0]["layout"],
    })
    ctx.add_artifact(report_info, "report")  # put's info has the sha256 (a local stat has none)
    return result


def _write_pages(ctx, spec, panels, cells, grid_rows, strengths, recommendation, result,
                 control: Image.Image | None = None) -> list[dict]:
    prefix = keys.grid_prefix(ctx.job_id)
    settings = settings_of(ctx)
    rows_per_page = spec.rows_per_page or max(1, settings.grid_page_cells // len(strengths))
    pages = page_rows(len(grid_rows), rows_per_page)
    pick = grid_rows[recommendation.row].label
    marked = f"recommended: {pick} at strength {format_strength(recommendation.strength)} (framed)"
    report = []
    for p, panel in enumerate(panels):
        message = pb.GridPanel(index=p, prompt=panel.prompt, seed=panel.seed)
        panel_report = {"index": p, "prompt": panel.prompt, "seed": panel.seed, "pages": []}
        for k, page in enumerate(pages):
            title = f'"{panel.prompt}"  seed {panel.seed}  {spec.width}x{spec.height}  {spec.steps} steps'
            title += f"  page {k + 1}/{len(pages)}" if len(pages) > 1 else ""
            highlight = None
            if recommendation.row in page:
                highlight = (recommendation.row - page.start, recommendation.col)
            image, layout = compose_grid(
                [cells[p][r] for r in page],
                row_labels=[grid_rows[r].label for r in page],
                col_labels=[format_strength(s) for s in strengths],
                title=f"{title}\n{marked}",
                highlight=highlight,
                header_image=control,
                header_label=f"every cell edits {spec.control_image}",
            )
            name = "grid" + (f"-{p + 1:02d}" if len(panels) > 1 else "") + (f"-page{k + 1}" if len(pages) > 1 else "")
            path = ctx.scratch / f"{name}.png"
            image.save(path)
            ctx.upload(path, prefix + path.name, "grid")
            message.page_keys.append(prefix + path.name)
            panel_report["pages"].append({
                "key": prefix + path.name, "rows": [page.start, page.stop], "highlight": highlight,
                "layout": {**dataclasses.asdict(layout), "width": image.width, "height": image.height},
            })
        result.panels.append(message)
        report.append(panel_report)
    return report
