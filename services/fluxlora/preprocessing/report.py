"""The dataset report: what a person reads to decide whether the photos are good enough to train.

Everything in it is derived from the manifest (which stays the per-image record). It is stored
as report.json beside the manifest and returned in PreprocessResult.report, where its lists are
cut to PROTO_LIST_LIMIT entries so one result can never exceed a gRPC message (report.json is
always complete).
"""

from __future__ import annotations

from pydantic import BaseModel

from fluxlora.preprocessing.advice import recommended_images
from fluxlora.preprocessing.manifest import Manifest, NearDuplicateGroup, RejectedFile

PROTO_LIST_LIMIT = 500


class DuplicateGroup(BaseModel):
    kept_source_key: str
    stem: str
    duplicate_source_keys: list[str]
    """Exact copies (same file bytes or same training pixels): reported, never trained."""


class FlaggedImage(BaseModel):
    stem: str
    source_key: str
    flags: list[str]
    warnings: list[str]
    blur_score: float


class DatasetReport(BaseModel):
    dataset_id: str
    lora_type: str
    crop_mode: str
    base_size: int
    recommended_images: int
    file_count: int
    image_count: int
    rejected_count: int
    duplicate_count: int
    near_duplicate_count: int
    """Images that belong to a near-duplicate group (all of them are trained)."""
    flagged_count: int
    blurry_count: int
    upscaled_count: int
    buckets: dict[str, int]
    warnings: list[str]
    rejected: list[RejectedFile]
    duplicate_groups: list[DuplicateGroup]
    near_duplicate_groups: list[NearDuplicateGroup]
    flagged: list[FlaggedImage]
    truncated: bool = False
    """True when the lists were cut (in the gRPC result only); report.json has them all."""


def build_report(manifest: Manifest) -> DatasetReport:
    options = manifest.options
    groups: dict[str, DuplicateGroup] = {}
    for duplicate in manifest.duplicates:
        group = groups.setdefault(
            duplicate.duplicate_of,
            DuplicateGroup(kept_source_key=duplicate.duplicate_of, stem=duplicate.stem, duplicate_source_keys=[]),
        )
        group.duplicate_source_keys.append(duplicate.source_key)
    flagged = [
        FlaggedImage(
            stem=e.stem, source_key=e.source_key, flags=list(e.flags), warnings=list(e.warnings),
            blur_score=e.blur_score,
        )
        for e in manifest.images
        if e.flags
    ]
    return DatasetReport(
        dataset_id=manifest.dataset_fingerprint,
        lora_type=options.lora_type,
        crop_mode=options.mode,
        base_size=options.base_size,
        recommended_images=recommended_images(options.lora_type),
        file_count=manifest.file_count,
        image_count=manifest.image_count,
        rejected_count=manifest.rejected_count,
        duplicate_count=manifest.duplicate_count,
        near_duplicate_count=sum(len(g.stems) for g in manifest.near_duplicate_groups),
        flagged_count=manifest.flagged_count,
        blurry_count=sum(1 for e in manifest.images if "blurry" in e.flags),
        upscaled_count=sum(1 for e in manifest.images if "upscaled" in e.flags),
        buckets=dict(manifest.buckets),
        warnings=list(manifest.warnings),
        rejected=list(manifest.rejected),
        duplicate_groups=sorted(groups.values(), key=lambda g: g.kept_source_key),
        near_duplicate_groups=list(manifest.near_duplicate_groups),
        flagged=flagged,
    )


def truncated_for_proto(report: DatasetReport, limit: int = PROTO_LIST_LIMIT) -> DatasetReport:
    lists = ("rejected", "duplicate_groups", "near_duplicate_groups", "flagged")
    if all(len(getattr(report, name)) <= limit for name in lists):
        return report
    return report.model_copy(update={name: getattr(report, name)[:limit] for name in lists} | {"truncated": True})
