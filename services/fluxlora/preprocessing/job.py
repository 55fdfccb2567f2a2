"""Runs one preprocessing job: originals from the store -> pipeline -> dataset in the store."""

from __future__ import annotations

from pathlib import Path

from fluxlora.common import keys
from fluxlora.common.errors import FailedPrecondition
from fluxlora.jobs.context import JobContext
from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.pipeline import preprocess_files
from fluxlora_api.v1 import preprocessing_pb2 as pb

CROP_MODES = {pb.CROP_MODE_UNSPECIFIED: "bucket", pb.CROP_MODE_BUCKET: "bucket", pb.CROP_MODE_SQUARE: "square"}
LORA_TYPES = {pb.LORA_TYPE_UNSPECIFIED: "concrete", pb.LORA_TYPE_CONCRETE: "concrete", pb.LORA_TYPE_STYLE: "style"}


def options_from_spec(spec: pb.PreprocessSpec) -> PreprocessOptions:
    return PreprocessOptions(
        base_size=spec.base_size or 1024,
        mode=CROP_MODES[spec.crop_mode],
        lora_type=LORA_TYPES[spec.lora_type],
    )


def run_preprocess(ctx: JobContext, spec: pb.PreprocessSpec) -> pb.PreprocessResult:
    options = options_from_spec(spec)
    sources = list(ctx.store.list(spec.source_prefix))
    files: list[tuple[str, Path]] = []
    for i, obj in enumerate(sources, 1):
        ctx.check_cancelled()
        relative = obj.key[len(spec.source_prefix):]
        files.append((relative, ctx.store.get_file(obj.key, ctx.scratch / "raw" / relative)))
        ctx.progress("downloading originals", i, len(sources), "file")

    out_dir = ctx.scratch / "images"
    manifest = preprocess_files(
        files, out_dir, options,
        progress=lambda done, total: ctx.progress("processing images", done, total, "image"),
    )
    dataset_id = manifest.dataset_fingerprint
    if manifest.image_count == 0:
        reasons = "; ".join(f"{r.source_key}: {r.reason}" for r in manifest.rejected[:5])
        raise FailedPrecondition(
            f"none of the {len(files)} files under {spec.source_prefix!r} is a usable image ({reasons}); "
            "upload JPEG, PNG, WebP, TIFF or BMP photos"
        )

    prefix = keys.dataset_prefix(dataset_id)
    for i, (relative, local) in enumerate(files, 1):
        ctx.check_cancelled()
        ctx.store.put_file(f"{prefix}raw/{relative}", local)
        ctx.progress("storing originals", i, len(files), "file")
    images = sorted(out_dir.iterdir())
    for i, path in enumerate(images, 1):
        ctx.check_cancelled()
        ctx.store.put_file(keys.dataset_images(dataset_id) + path.name, path, "image/png")
        ctx.progress("storing images", i, len(images), "image")
    for warning in manifest.warnings:
        ctx.warn(warning)
    # The manifest goes last: a dataset without one is incomplete and no later stage accepts it.
    manifest_path = ctx.scratch / "manifest.json"
    manifest_path.write_text(manifest.model_dump_json(indent=2))
    ctx.upload(manifest_path, keys.dataset_manifest(dataset_id), "dataset-manifest")
    return pb.PreprocessResult(
        dataset_id=dataset_id,
        image_count=manifest.image_count,
        rejected_count=manifest.rejected_count,
        manifest_key=keys.dataset_manifest(dataset_id),
        warnings=manifest.warnings,
    )
