"""Runs one grid job: checkpoints from the store -> rendered cells -> labelled grid in the store."""

from __future__ import annotations

import dataclasses

from google.protobuf import json_format

from fluxlora.common import keys
from fluxlora.common.models import resolve_model
from fluxlora.common.runs import select_checkpoints
from fluxlora.evaluation.grid import compose_grid, format_strength
from fluxlora.evaluation.render import render_grid_cells
from fluxlora.jobs.context import JobContext
from fluxlora_api.v1 import evaluation_pb2 as pb


def run_grid(ctx: JobContext, spec: pb.GridSpec) -> pb.GridResult:
    grid_id = ctx.job_id
    prefix = keys.grid_prefix(grid_id)
    checkpoints = select_checkpoints(ctx.store, spec.run_id, list(spec.checkpoint_steps))
    loras = []
    for step, key in checkpoints.items():
        ctx.check_cancelled()
        loras.append((f"step {step}", ctx.store.get_file(key, ctx.scratch / "loras" / f"step-{step:06d}.safetensors")))
    model_dir = resolve_model(spec.base_model, ctx.store, ctx.settings.cache_dir, "base model")
    strengths = list(spec.strengths)
    cells = render_grid_cells(
        model_dir, loras, strengths, spec.prompt, spec.seed, spec.width, spec.height, spec.steps, spec.guidance,
        progress=lambda done, total: (ctx.check_cancelled(), ctx.progress("rendering cells", done, total, "cell")),
    )

    result = pb.GridResult(grid_id=grid_id, rows=len(loras), cols=len(strengths))
    cells_dir = ctx.scratch / "cells"
    cells_dir.mkdir()
    for row, step in enumerate(checkpoints):
        for col, strength in enumerate(strengths):
            path = cells_dir / f"step-{step:06d}_strength-{format_strength(strength)}.png"
            cells[row][col].save(path)
            key = prefix + "cells/" + path.name
            ctx.upload(path, key, "grid-cell", step)
            result.cells.append(pb.GridCell(row=row, col=col, step=step, strength=strength, image_key=key))

    title = f'"{spec.prompt}"  seed {spec.seed}  {spec.width}x{spec.height}  {spec.steps} steps'
    grid, layout = compose_grid(
        cells,
        row_labels=[f"step {s}" for s in checkpoints],
        col_labels=[format_strength(s) for s in strengths],
        title=title,
    )
    grid_path = ctx.scratch / "grid.png"
    grid.save(grid_path)
    result.grid_key = prefix + "grid.png"
    ctx.upload(grid_path, result.grid_key, "grid")
    result.report_key = prefix + "report.json"
    ctx.store.put_json(result.report_key, {
        "grid_id": grid_id,
        "spec": json_format.MessageToDict(spec),
        "cells": [json_format.MessageToDict(c) for c in result.cells],
        "layout": {**dataclasses.asdict(layout), "width": grid.width, "height": grid.height},
    })
    ctx.add_artifact(ctx.store.stat(result.report_key), "report")
    return result
