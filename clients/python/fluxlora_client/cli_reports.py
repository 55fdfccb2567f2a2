"""What the stage commands print for a person: a dataset's report, a training memory plan and where
the pipeline's outputs are, as tables (and the pipeline's outputs as JSON for --json)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape

from fluxlora_api.v1 import training_pb2
from fluxlora_client.cli_support import console, table


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


def print_plan(plan) -> None:
    if plan.memory_choice:
        console.print(escape(plan.memory_choice), highlight=False)
        console.print("  as flags: " + " ".join(plan_flags(dict(plan.picked))), highlight=False, soft_wrap=True)
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    console.print(f"{plan.mode}: {plan.total_gib:.1f} GiB estimated ({plan.step_peak_gib:.1f} step peak, "
                  f"{plan.weights_gib:.1f} weights, {plan.overhead_gib:.1f} overhead): {verdict} "
                  f"in {plan.target_gib:.1f} GiB" + (f" ({escape(plan.target_source)})" if plan.target_source else ""))
    if plan.cluster_queue:
        flavors = table("flavor", "GPU", "GiB", "GPU quota", "fits", "GPUs within quota",
                        title=f"ClusterQueue {plan.cluster_queue}: where Kueue may admit the run")
        for f in plan.flavors:
            flavors.add_row(escape(f.name), escape(f.gpu_product or "?"),
                            f"{f.gpu_memory_gib:g}" if f.gpu_memory_gib else "unknown", _quota(f),
                            "[green]yes[/green]" if f.fits else "[red]no[/red]",
                            "[green]yes[/green]" if f.fits_quota else "[red]no[/red]")
        console.print(flavors)
    if plan.alternatives:
        options = table("options that fit", "GiB", "runnable here", title="fluxlora train options that fit")
        for alt in plan.alternatives:
            options.add_row(" ".join(plan_flags(dict(alt.changes))), f"{alt.total_gib:.1f}",
                            "yes" if not alt.unavailable else "no: " + escape("; ".join(alt.unavailable)))
        console.print(options)


def _quota(flavor) -> str:
    """The flavor's GPU quota, and what borrowing from its cohort adds, e.g. "4 (8 borrowing)"."""
    if not flavor.HasField("gpu_limit"):
        return f"{flavor.gpu_quota} (more borrowing)"
    if flavor.gpu_limit > flavor.gpu_quota:
        return f"{flavor.gpu_quota} ({flavor.gpu_limit} borrowing)"
    return str(flavor.gpu_quota)


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


def print_outputs(outputs, out: Console) -> None:
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
    out.print(outputs_table)
