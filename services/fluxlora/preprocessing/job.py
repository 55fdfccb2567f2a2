"""Runs one preprocessing job: originals from the store -> pipeline -> dataset in the store.

Stored under datasets/<id>/: raw/ (every uploaded object, byte for byte, zips included),
images/<stem>.png, report.json, contact_sheet.png and, last, manifest.json (the "complete"
marker no later stage runs without).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from google.protobuf import json_format

from fluxlora.common import keys
from fluxlora.common.limits import Bound, check_numbers
from fluxlora.domain.archives import ArchiveRejected, expand_archive, is_archive
from fluxlora.jobs.context import JobContext
from fluxlora.preprocessing.defaults import COLOURS, DEFAULTS
from fluxlora.preprocessing.manifest import (
    PreprocessOptions,
    RejectedFile,
)
from fluxlora.preprocessing.naming import folder_name
from fluxlora.preprocessing.pair_sheet import save_pair_sheet
from fluxlora.preprocessing.pairs import CONTROL_DIR, attach_controls, split_pairs
from fluxlora.preprocessing.pipeline import preprocess_files
from fluxlora.preprocessing.report import build_report, truncated_for_proto
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument
from fluxlora_api.shared.files import check_upload_bytes
from fluxlora_api.v1 import preprocessing_pb2 as pb

log = logging.getLogger(__name__)

CROP_MODES = {
    pb.CROP_MODE_UNSPECIFIED: DEFAULTS.crop_mode,
    pb.CROP_MODE_BUCKET: "bucket",
    pb.CROP_MODE_SQUARE: "square",
    pb.CROP_MODE_SUBJECT: "subject",
    pb.CROP_MODE_PAD: "pad",
}
LORA_TYPES = {
    pb.LORA_TYPE_UNSPECIFIED: DEFAULTS.lora_type,
    pb.LORA_TYPE_CONCRETE: "concrete",
    pb.LORA_TYPE_STYLE: "style",
}
_HEX_COLOUR = re.compile(r"^#?([0-9a-fA-F]{6})$")
# Every numeric PreprocessSpec field (fluxlora.common.limits.check_numbers). A 4096 px square training
# image is 48 MiB of pixels per worker; FLUX trains at 512-1024.
MAX_BASE_SIZE = 4096
BOUNDS = {
    "base_size": Bound(0, MAX_BASE_SIZE, f"0 means {DEFAULTS.base_size}; a multiple of 64; FLUX trains at 512 to 1024"),
    "min_side": Bound(0, MAX_BASE_SIZE, "0 means max(64, base_size / 4)"),
    "blur_threshold": Bound(0, 100_000, "0 turns the check off, the default is 18; sharp photos score 26 and up"),
    "near_duplicate_distance": Bound(-1, 32, "-1 turns the check off, the default is 13; other photos are 18+ apart"),
    "monochrome_threshold": Bound(0, 255, "0 turns the check off, the default is 9; colour photos score 10 and up"),
}


def options_from_spec(spec: pb.PreprocessSpec) -> PreprocessOptions:
    """The pipeline's options for a spec; InvalidArgument naming the field when one is wrong."""
    check_numbers(spec, BOUNDS)
    if spec.crop_mode not in CROP_MODES:
        raise InvalidArgument(f"spec.crop_mode {spec.crop_mode} is not a CropMode; use {', '.join(pb.CropMode.keys())}")
    if spec.lora_type not in LORA_TYPES:
        raise InvalidArgument(f"spec.lora_type {spec.lora_type} is not a LoraType; use {', '.join(pb.LoraType.keys())}")
    if spec.min_side < 0:
        raise InvalidArgument(f"spec.min_side must be 0 (the default) or positive, got {spec.min_side}")
    blur = spec.blur_threshold if spec.HasField("blur_threshold") else DEFAULTS.blur_threshold
    if not blur >= 0:  # also catches NaN
        raise InvalidArgument(f"spec.blur_threshold must be 0 (off) or positive, got {blur}")
    near = (spec.near_duplicate_distance if spec.HasField("near_duplicate_distance")
            else DEFAULTS.near_duplicate_distance)
    mono = spec.monochrome_threshold if spec.HasField("monochrome_threshold") else DEFAULTS.monochrome_threshold
    return PreprocessOptions(
        base_size=spec.base_size or DEFAULTS.base_size,
        mode=CROP_MODES[spec.crop_mode],
        lora_type=LORA_TYPES[spec.lora_type],
        background=_colour(spec.background),
        min_side=spec.min_side or None,
        # float32 on the wire: round so 20.1 stays 20.1 in the manifest and the dataset id.
        blur_threshold=round(float(blur), 4),
        near_duplicate_distance=near,
        monochrome_threshold=round(float(mono), 4),
    )


def pool_size(configured: int = 0) -> int:
    """Worker processes for one job: FLUXLORA_PREPROCESS_WORKERS when set (> 0), else the cores this
    process may use (its CPU affinity, capped by a cgroup CPU quota: a pod limited to 2 CPUs on a
    64-core node gets 2)."""
    if configured > 0:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """CPUs allowed by a cgroup v2 quota ("200000 100000" -> 2), rounded up; None without one."""
    try:
        quota, period = path.read_text().split()[:2]
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2, or "max" (no quota)
        return None


def run_preprocess(ctx: JobContext, spec: pb.PreprocessSpec) -> pb.PreprocessResult:
    options = options_from_spec(spec)
    sources = list(ctx.store.list(spec.source_prefix))
    limit = getattr(ctx.settings, "max_upload_bytes", None)
    if limit:  # again here: files may have been added under the prefix since the submit was checked
        check_upload_bytes([o.size for o in sources], limit, folder_name(spec.source_prefix))
    originals: list[tuple[str, Path]] = []
    for i, obj in enumerate(sources, 1):
        ctx.check_cancelled()
        relative = obj.key[len(spec.source_prefix):]
        originals.append((relative, ctx.store.get_file(obj.key, ctx.scratch / "raw" / relative)))
        ctx.progress("downloading originals", i, len(sources), "file")

    files, refused = _unpack_archives(ctx, originals)
    pairs = split_pairs(files)  # editing datasets: before/after pairs, the targets processed as usual
    out_dir = ctx.scratch / "images"
    sheet_path = ctx.scratch / "contact_sheet.png"
    manifest = preprocess_files(
        pairs.targets, out_dir, options,
        progress=lambda done, total: _progress(ctx, done, total),
        workers=pool_size(getattr(ctx.settings, "preprocess_workers", 0)),
        # A pair dataset's sheet is drawn once the pairs are decided: a tile per pair, control | target.
        contact_sheet=None if pairs.paired else sheet_path,
        rejected_upstream=refused,
    )
    if pairs.paired:
        manifest = attach_controls(manifest, pairs, out_dir)
        save_pair_sheet(manifest, pairs, out_dir, sheet_path)
    dataset_id = manifest.dataset_fingerprint
    if manifest.image_count == 0:
        reasons = "; ".join(f"{r.source_key}: {r.reason}" for r in manifest.rejected[:5])
        raise FailedPrecondition(
            f"none of the {manifest.file_count} files in {folder_name(spec.source_prefix)} is a usable image "
            f"({reasons}); upload JPEG, PNG, WebP, TIFF or BMP photos"
        )

    complete_before = ctx.store.exists(keys.dataset_manifest(dataset_id))  # the same photos, preprocessed earlier
    try:
        _store_files(ctx, dataset_id, originals, sorted(p for p in out_dir.iterdir() if p.is_file()),
                     sorted((out_dir / CONTROL_DIR).glob("*.png")))
    except OSError:
        # A full disk (or any store failure) part-way: take back what this attempt stored, so no stray
        # copies of the originals fill the disk further; the upload itself stays for a retry.
        if not complete_before:
            _remove_incomplete(ctx, dataset_id)
        raise
    for warning in manifest.warnings:
        ctx.warn(warning)

    report = build_report(manifest)
    report_path = ctx.scratch / "report.json"
    report_path.write_text(report.model_dump_json(indent=2))
    ctx.upload(report_path, report_key(dataset_id), "dataset-report")
    ctx.upload(sheet_path, contact_sheet_key(dataset_id), "contact-sheet")
    # The manifest goes last: a dataset without one is incomplete and no later stage accepts it.
    manifest_path = ctx.scratch / "manifest.json"
    manifest_path.write_text(manifest.model_dump_json(indent=2))
    ctx.upload(manifest_path, keys.dataset_manifest(dataset_id), "dataset-manifest")
    return pb.PreprocessResult(
        dataset_id=dataset_id,
        image_count=manifest.image_count,
        rejected_count=manifest.rejected_count,
        duplicate_count=manifest.duplicate_count,
        manifest_key=keys.dataset_manifest(dataset_id),
        warnings=manifest.warnings,
        report=json_format.ParseDict(truncated_for_proto(report).model_dump(mode="json"), pb.DatasetReport()),
        report_key=report_key(dataset_id),
        contact_sheet_key=contact_sheet_key(dataset_id),
    )


def _store_files(ctx: JobContext, dataset_id: str, originals: list[tuple[str, Path]], images: list[Path],
                 controls: list[Path]) -> None:
    prefix = keys.dataset_prefix(dataset_id)
    for i, (relative, local) in enumerate(originals, 1):
        ctx.check_cancelled()
        ctx.store.put_file(f"{prefix}raw/{relative}", local)
        ctx.progress("storing originals", i, len(originals), "file")
    for i, path in enumerate(images, 1):
        ctx.check_cancelled()
        ctx.store.put_file(keys.dataset_images(dataset_id) + path.name, path, "image/png")
        ctx.progress("storing images", i, len(images), "image")
    for i, path in enumerate(controls, 1):  # apart from images/: captioning and scoring never see them
        ctx.check_cancelled()
        ctx.store.put_file(keys.dataset_controls(dataset_id) + path.name, path, "image/png")
        ctx.progress("storing control images", i, len(controls), "image")


def _remove_incomplete(ctx: JobContext, dataset_id: str) -> None:
    """Deletes what a failed attempt stored of a dataset that has no manifest (so no stage uses it)."""
    prefix = keys.dataset_prefix(dataset_id)
    removed = 0
    try:
        for info in list(ctx.store.list(prefix)):
            ctx.store.delete(info.key)
            removed += 1
    except Exception as exc:  # noqa: BLE001 - the job's own error is the one to report
        log.warning("could not remove the incomplete dataset %s: %s", prefix, exc)
    if removed:
        log.info("removed %d objects of the incomplete dataset %s", removed, prefix)


def _progress(ctx: JobContext, done: int, total: int) -> None:
    ctx.check_cancelled()  # raising here stops the worker pool (pipeline.preprocess_files)
    ctx.progress("processing images", done, total, "image")


def report_key(dataset_id: str) -> str:
    return f"{keys.dataset_prefix(dataset_id)}report.json"


def contact_sheet_key(dataset_id: str) -> str:
    return f"{keys.dataset_prefix(dataset_id)}contact_sheet.png"


def _unpack_archives(
    ctx: JobContext, originals: list[tuple[str, Path]]
) -> tuple[list[tuple[str, Path]], list[RejectedFile]]:
    """Zips become their members; a refused zip, or a member that is not a photo, a rejection."""
    files: list[tuple[str, Path]] = []
    refused: list[RejectedFile] = []
    archives = [(key, path) for key, path in originals if is_archive(key)]
    for i, (key, path) in enumerate(archives, 1):
        ctx.check_cancelled()
        try:
            expanded = expand_archive(path, ctx.scratch / "unpacked" / str(i), key)
        except ArchiveRejected as exc:
            refused.append(RejectedFile(source_key=key, reason=f"archive refused: {exc.reason}"))
            continue
        files.extend(expanded.files)
        refused.extend(RejectedFile(source_key=k, reason=reason) for k, reason in expanded.rejected)
        ctx.progress("unpacking archives", i, len(archives), "archive")
    files.extend((key, path) for key, path in originals if not is_archive(key))
    return files, refused


def _colour(text: str) -> tuple[int, int, int]:
    if not text.strip():
        return COLOURS[DEFAULTS.background]
    match = _HEX_COLOUR.match(text.strip())
    if match is None:
        raise InvalidArgument(f"spec.background {text!r} is not a colour; use '#rrggbb', e.g. '#ffffff' for white")
    value = match.group(1)
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)
