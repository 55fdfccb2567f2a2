"""Local files in, training images and a manifest out: the whole preprocessing step, no I/O
beyond the paths it is given (the service layer downloads and uploads around it).

Every input ends up in exactly one of manifest.images, .rejected or .duplicates, so nothing is
dropped silently. Files are processed in parallel (worker.py: one file per task, small records
back) and every decision that depends on other files (exact duplicates, output names,
near-duplicate groups) is made afterwards in source-key order, which makes names, duplicate
choices and output bytes independent of the worker count and of the order the caller lists
files in.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from fluxlora.preprocessing.advice import dataset_warnings, recommended_images, some
from fluxlora.preprocessing.contact_sheet import THUMB, ContactSheet, sheet_header, sheet_positions, tile_marks
from fluxlora.preprocessing.manifest import (
    DuplicateFile,
    ImageEntry,
    Manifest,
    NearDuplicateGroup,
    PreprocessOptions,
    RejectedFile,
)
from fluxlora.preprocessing.naming import StemAllocator
from fluxlora.preprocessing.pool import run_tasks
from fluxlora.preprocessing.quality import Cluster, near_duplicate_clusters
from fluxlora.preprocessing.worker import Outcome, Task, file_sha256

__all__ = ["PIPELINE_VERSION", "dataset_fingerprint", "dataset_warnings", "preprocess_files", "recommended_images"]

# Part of the fingerprint: bump when the same inputs and options would give different outputs.
PIPELINE_VERSION = 3

Progress = Callable[[int, int], None]
"""progress(done, total) after each file; raising from it (e.g. on cancel) aborts the run."""


def preprocess_files(
    files: Sequence[tuple[str, Path]],
    out_dir: Path,
    options: PreprocessOptions | None = None,
    progress: Progress | None = None,
    *,
    workers: int = 1,
    contact_sheet: Path | None = None,
    rejected_upstream: Sequence[RejectedFile] = (),
) -> Manifest:
    """Validate, de-duplicate and crop `files` ((source_key, local_path) pairs) into `out_dir`.

    Writes `out_dir/<stem>.png` per accepted image and returns the manifest (the caller stores
    it). `out_dir` should be empty: files already there are overwritten or left as they are.
    `workers` > 1 runs files in a process pool; `contact_sheet` also writes a PNG of the whole
    set there; `rejected_upstream` are inputs refused before they became files (e.g. an unsafe
    archive), reported with the rest.
    """
    options = options or PreprocessOptions()
    ordered = _sorted_unique(files, rejected_upstream)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    positions = sheet_positions([key for key, _ in ordered], rejected_upstream)
    sheet = ContactSheet(len(positions)) if contact_sheet is not None else None
    tasks = [
        Task(i, key, path, options, staging, THUMB if sheet is not None else 0)
        for i, (key, path) in enumerate(ordered)
    ]
    try:
        outcomes: list[Outcome | None] = [None] * len(tasks)
        # closing(): on an error or a cancel (progress raising) the pool stops now, not when the
        # traceback holding this frame is freed.
        with contextlib.closing(run_tasks(tasks, workers)) as results:
            for done, outcome in enumerate(results, start=1):
                if sheet is not None and outcome.thumb is not None:
                    sheet.paste(positions[outcome.key], *outcome.thumb)
                outcome.thumb = None
                outcomes[outcome.index] = outcome
                if progress is not None:
                    progress(done, len(tasks))
        manifest = _assemble([o for o in outcomes if o is not None], rejected_upstream, staging, out_dir, options)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if sheet is not None and contact_sheet is not None:
        sheet.save(Path(contact_sheet), tile_marks(manifest, positions), *sheet_header(manifest))
    return manifest


def dataset_fingerprint(
    files: Sequence[tuple[str, Path]],
    options: PreprocessOptions,
    rejected_upstream: Sequence[RejectedFile] = (),
) -> str:
    """A short id ("ds-" + 12 hex) equal for the same files (keys and bytes) and options.

    Keys count as well as bytes because output names derive from them; order does not count.
    The same value is in Manifest.dataset_fingerprint, so a service can look up a finished
    dataset before doing the work again.
    """
    ordered = _sorted_unique(files, rejected_upstream)
    return _fingerprint([(key, file_sha256(path) or "unreadable") for key, path in ordered], rejected_upstream, options)


def _assemble(
    outcomes: Sequence[Outcome],
    rejected_upstream: Sequence[RejectedFile],
    staging: Path,
    out_dir: Path,
    options: PreprocessOptions,
) -> Manifest:
    images: list[ImageEntry] = []
    rejected: list[RejectedFile] = list(rejected_upstream)
    duplicates: list[DuplicateFile] = []
    by_bytes: dict[str, ImageEntry] = {}
    by_pixels: dict[str, ImageEntry] = {}
    stems = StemAllocator(outcome.key for outcome in outcomes)
    for outcome in outcomes:
        if outcome.reason is not None:
            rejected.append(RejectedFile(source_key=outcome.key, reason=outcome.reason))
            continue
        kept = by_bytes.get(outcome.sha256 or "") or by_pixels.get(outcome.fields["pixel_sha256"])
        if kept is not None:
            match = "file bytes" if kept.sha256 == outcome.sha256 else "pixels"
            duplicates.append(
                DuplicateFile(source_key=outcome.key, duplicate_of=kept.source_key, stem=kept.stem, match=match)
            )
            (staging / str(outcome.staged)).unlink(missing_ok=True)
            continue
        stem = stems.claim(outcome.key)
        entry = ImageEntry(stem=stem, file_name=f"{stem}.png", **outcome.fields)
        os.replace(staging / str(outcome.staged), out_dir / entry.file_name)
        images.append(entry)
        by_bytes[entry.sha256] = entry
        by_pixels[entry.pixel_sha256] = entry
    rejected.sort(key=lambda entry: entry.source_key)

    groups = _near_duplicates(images, options)
    return Manifest(
        dataset_fingerprint=_fingerprint(
            [(o.key, o.sha256 or "unreadable") for o in outcomes], rejected_upstream, options
        ),
        options=options,
        file_count=len(outcomes) + len(rejected_upstream),
        image_count=len(images),
        rejected_count=len(rejected),
        duplicate_count=len(duplicates),
        flagged_count=sum(1 for entry in images if entry.flags),
        buckets=dict(sorted(Counter(entry.bucket for entry in images).items())),
        warnings=dataset_warnings(images, rejected, duplicates, options, groups),
        images=images,
        rejected=rejected,
        duplicates=duplicates,
        near_duplicate_groups=groups,
    )


def near_duplicate_groups(images: Sequence[ImageEntry], options: PreprocessOptions) -> list[Cluster]:
    """Groups of images that look alike under `options` (indices into `images`); the colour of a
    monochrome image is not compared, so a grey or sepia copy groups with its colour original."""
    hashes = [(e.phash, e.dhash, "" if e.colour_spread < options.monochrome_threshold else e.colour) for e in images]
    return near_duplicate_clusters(hashes, options.near_duplicate_distance)


def _near_duplicates(images: list[ImageEntry], options: PreprocessOptions) -> list[NearDuplicateGroup]:
    groups: list[NearDuplicateGroup] = []
    for number, cluster in enumerate(near_duplicate_groups(images, options)):
        members = [images[i] for i in cluster.members]
        groups.append(
            NearDuplicateGroup(
                stems=[m.stem for m in members], source_keys=[m.source_key for m in members],
                max_distance=cluster.max_distance,
            )
        )
        for member in members:
            others = [m.source_key for m in members if m is not member]
            member.near_duplicate_group = number
            member.flags.append("near_duplicate")
            member.warnings.append(
                f"near duplicate of {some(others, 3)} (perceptual hash distance up to {cluster.max_distance}); "
                "keep the best shot of the group: near-identical photos teach the model less than varied ones"
            )
    return groups


def _sorted_unique(
    files: Sequence[tuple[str, Path]], rejected_upstream: Sequence[RejectedFile] = ()
) -> list[tuple[str, Path]]:
    ordered = sorted(((str(key), Path(path)) for key, path in files), key=lambda kv: kv[0])
    keys = sorted([key for key, _ in ordered] + [entry.source_key for entry in rejected_upstream])
    for a, b in itertools.pairwise(keys):
        if a == b:
            raise ValueError(f"source key {a!r} given twice")
    return ordered


def _fingerprint(
    digests: Sequence[tuple[str, str]], rejected_upstream: Sequence[RejectedFile], options: PreprocessOptions
) -> str:
    payload = {
        "pipeline": PIPELINE_VERSION,
        "options": options.model_dump(mode="json"),
        "files": sorted(digests),
    }
    if rejected_upstream:
        payload["refused"] = sorted(entry.source_key for entry in rejected_upstream)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "ds-" + hashlib.sha256(text.encode()).hexdigest()[:12]
