"""Runs one captioning job: dataset images from the store -> captioner -> cleaned captions
(kohya-style <stem>.txt beside each image, plus captions.json) back in the store, and a new draft
caption version (versions.py) for people to review and approve."""

from __future__ import annotations

import threading
from pathlib import Path

from fluxlora.captioning.captioners.base import Captioner, load_captioner
from fluxlora.captioning.captioners.imported import CAPTION_SUFFIXES, unpack_caption_files
from fluxlora.captioning.cleaning import clean_captions
from fluxlora.captioning.dataset import generate_captions, generate_pair_captions, write_sidecars
from fluxlora.captioning.defaults import DEFAULTS, PAIR_STYLE
from fluxlora.captioning.instructions import SAME, instruction_captions
from fluxlora.captioning.model_tokenizers import counters_for
from fluxlora.captioning.review import open_versions
from fluxlora.captioning.text_encoders import length_warnings, over_length, trigger_warnings
from fluxlora.common import keys
from fluxlora.common.limits import check_caption_lengths
from fluxlora.common.models import resolve_model
from fluxlora.domain.archives import ARCHIVE_SUFFIXES, is_archive
from fluxlora.domain.datasets import is_pair_dataset, stored_controls
from fluxlora.jobs.context import JobContext, JobInterrupted
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument
from fluxlora_api.v1 import captioning_pb2 as pb

_loaded: dict[tuple, Captioner] = {}
_load_lock = threading.Lock()
_loads = 0


def cached_captioner(kind: str, model_dir: Path, task: str, batch_size: int, max_new_tokens: int,
                     device: str) -> Captioner:
    """Loads a captioner once per process: later jobs with the same model reuse it."""
    global _loads
    key = (kind, str(model_dir), task, batch_size, max_new_tokens, device)
    with _load_lock:
        if key not in _loaded:
            _loaded.clear()  # one model resident at a time; GPU memory is the scarce thing
            _loaded[key] = load_captioner(
                kind, model_dir, task=task, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
            )
            _loads += 1
        return _loaded[key]


def captioner_loads() -> int:
    """How many times this process has loaded a captioning model (bench/caption.py checks it stays 1)."""
    return _loads


def run_caption(ctx: JobContext, spec: pb.CaptionSpec) -> pb.CaptionResult:
    images_prefix = keys.dataset_images(spec.dataset_id)
    image_keys = [o.key for o in ctx.store.list(images_prefix) if o.key.endswith(".png")]
    local = []
    for i, key in enumerate(image_keys, 1):
        ctx.check_cancelled()
        local.append(ctx.store.get_file(key, ctx.scratch / "images" / key[len(images_prefix):]))
        ctx.progress("downloading images", i, len(image_keys), "image")

    ctx.progress("loading captioner", 0)
    if spec.captioner == "import":
        captioner = _import_captioner(ctx, spec)
    else:
        model_dir = resolve_model(spec.model, ctx.store, ctx.settings.cache_dir, "captioning model")
        captioner = cached_captioner(
            spec.captioner, model_dir, spec.task, spec.batch_size, spec.max_new_tokens, ctx.settings.device
        )
    style = spec.style or DEFAULTS.style
    before: dict[str, str] = {}
    if style == PAIR_STYLE:
        pairs = _pairs(ctx, spec.dataset_id, local)
        before, raw = generate_pair_captions(
            pairs, captioner, batch_size=spec.batch_size,
            progress=lambda done, total: ctx.progress("describing before/after pairs", done, total, "image"),
            should_stop=lambda: ctx.should_stop,
        )
    else:
        raw = generate_captions(
            local,
            captioner,
            batch_size=spec.batch_size,
            progress=lambda done, total: ctx.progress("captioning", done, total, "image"),
            should_stop=lambda: ctx.should_stop,
        )
    if ctx.should_stop:
        raise JobInterrupted(ctx.job_id)
    if spec.captioner == "import":
        for entry in captioner.unmatched():
            ctx.warn(f"imported caption {entry} matches no image of the dataset and was not used")

    if style == PAIR_STYLE:
        written = instruction_captions(before, raw, spec.trigger_word, list(spec.remove_phrases),
                                       spec.trigger_position)
        captions, phrase_counts = written.captions, written.phrase_counts
        _note_instructions(ctx, written.kinds)
    else:
        if spec.captioner != "import" and is_pair_dataset(ctx.store, spec.dataset_id):
            # The captioner saw the after images only; an editing LoRA's captions are instructions.
            ctx.warn(f"this is an editing (before/after pair) dataset: its captions are the edit instructions, "
                     f"and these {style} captions describe the after images only; rewrite each as the instruction "
                     "(e.g. \"make the sky stormy\") in caption review, or import instruction captions, before "
                     f"approving (style {PAIR_STYLE!r}, the default here, writes them from both images)")
        cleaned = clean_captions(raw, spec.trigger_word, list(spec.remove_phrases), spec.trigger_position, style)
        captions, phrase_counts = cleaned.captions, cleaned.phrase_counts
    limit = getattr(ctx.settings, "max_caption_chars", None)
    if spec.captioner == "import" and limit:  # generated captions are bounded by max_new_tokens already
        check_caption_lengths(captions, limit, f"imported captions ({spec.captions_source or 'the upload'})")
    for phrase, count in phrase_counts.items():
        ctx.log(f"remove phrase {phrase!r} changed {count} of {len(captions)} captions")
        if count == 0:
            ctx.warn(f"remove phrase {phrase!r} is in none of the captions: check its spelling")

    ctx.progress("checking captions", 0)
    counters, notes = counters_for(spec.base_model, ctx.store, ctx.settings.cache_dir)
    for note in notes:
        ctx.log(note)
    for warning in trigger_warnings(spec.trigger_word, counters):
        ctx.warn(warning)
    for warning in length_warnings(captions, counters):
        ctx.warn(warning)

    out_dir = ctx.scratch / "captions"
    write_sidecars(captions, out_dir)
    for path in sorted(out_dir.glob("*.txt")):
        ctx.store.put_file(images_prefix + path.name, path, "text/plain; charset=utf-8")
    settings = {
        "captioner": spec.captioner,
        "model": spec.model,
        "task": spec.task,
        "remove_phrases": list(spec.remove_phrases),
        "trigger_position": spec.trigger_position,
        "style": style,
        "captions_source": spec.captions_source,
        "job_id": ctx.job_id,
    }
    versions = open_versions(ctx.store, spec.dataset_id)
    with versions.locked():
        head = versions.head()
        version = versions.append(
            parent=head.version if head else 0, kind="import" if spec.captioner == "import" else "auto",
            trigger_word=spec.trigger_word, captions=captions, author=ctx.job_id,
            comment=f"{spec.captioner} captions" + (" (edit instructions)" if style == PAIR_STYLE else ""),
            # Each instruction's two descriptions stay with the version it started, for review.
            source={**settings, **({"descriptions": _descriptions(before, raw)} if style == PAIR_STYLE else {})},
        )
    # Written last: training accepts a dataset only once captions.json exists. The captions are a
    # draft until a person approves a version (ApproveCaptions), which rewrites both.
    info = ctx.store.put_json(keys.dataset_captions(spec.dataset_id), {
        "trigger_word": spec.trigger_word,
        **settings,
        "captions": captions,
        "caption_version": version.version,
        "approved_version": None,
        "sha256": version.sha256,
    })
    ctx.add_artifact(info, "captions")
    return pb.CaptionResult(
        dataset_id=spec.dataset_id,
        caption_count=len(captions),
        captions_key=keys.dataset_captions(spec.dataset_id),
        version=version.version,
        removed_phrase_counts=phrase_counts,
        over_length_count=len(over_length(captions, counters)),
        exact_token_counts=all(c.exact for c in counters),
    )


def _import_captioner(ctx: JobContext, spec: pb.CaptionSpec):
    """The import captioner over caption files from captions_source, or from the dataset's uploads
    (raw/ keeps every uploaded object, zips whole: the caption files inside them count too)."""
    prefix = keys.dataset_prefix(spec.dataset_id)
    source = spec.captions_source or f"{prefix}raw/"
    wanted = CAPTION_SUFFIXES + tuple(sorted(ARCHIVE_SUFFIXES))
    if source.endswith("/"):
        objects = [o.key for o in ctx.store.list(source) if o.key.lower().endswith(wanted)]
    else:
        objects = [source]
    if not objects:
        raise InvalidArgument(
            f"no caption files ({', '.join(CAPTION_SUFFIXES)}) or zips holding them under {source!r}: upload "
            "them with the photos or pass spec.captions_source"
        )
    base = source if source.endswith("/") else source.rsplit("/", 1)[0] + "/"
    root = ctx.scratch / "import"
    root.mkdir(parents=True, exist_ok=True)
    archives = []
    for key in objects:
        ctx.check_cancelled()
        relative = key[len(base):]
        if not is_archive(key):
            ctx.store.get_file(key, root / relative)
            continue
        # Names like preprocessing's source keys ("photos.zip/sub/img1.jpg"), so sidecars meet their photos.
        archive = ctx.store.get_file(key, ctx.scratch / "zips" / relative)
        try:
            found = unpack_caption_files(archive, root, relative)
        except ValueError as exc:
            ctx.warn(f"caption files inside {key!r} were not read: {exc}")
            continue
        finally:
            archive.unlink(missing_ok=True)
        ctx.log(f"{len(found)} caption file(s) inside {key!r}")
        archives.append(relative)
    manifest = ctx.store.get_json(keys.dataset_manifest(spec.dataset_id))
    aliases: dict[str, list[str]] = {}
    for image in manifest.get("images", []):
        aliases.setdefault(image["stem"], []).append(image["source_key"])
    return load_captioner("import", root, aliases=aliases, archives=archives)


def _pairs(ctx: JobContext, dataset_id: str, targets: list[Path]) -> list[tuple[Path, Path]]:
    """(before, after) local paths: each training image with its control image (the same file name),
    downloaded beside it."""
    stored = stored_controls(ctx.store, dataset_id)
    missing = sorted(t.name for t in targets if t.name not in stored)
    if missing:
        raise FailedPrecondition(
            f"dataset {dataset_id!r} is an editing dataset, but {keys.dataset_controls(dataset_id)} lacks the "
            f"before image(s) of {', '.join(missing[:20])}{' and more' if len(missing) > 20 else ''}: preprocess "
            "the pairs again"
        )
    pairs = []
    for i, target in enumerate(targets, 1):
        ctx.check_cancelled()
        pairs.append((ctx.store.get_file(stored[target.name], ctx.scratch / "control" / target.name), target))
        ctx.progress("downloading before images", i, len(targets), "image")
    return pairs


def _note_instructions(ctx: JobContext, kinds: dict[str, str]) -> None:
    ctx.warn("this is an editing (before/after pair) dataset: its captions are edit instructions written from a "
             "description of each before and after image (what differs, word by word); review them before "
             "approving (`fluxlora caption review` shows both descriptions under each)")
    alike = sorted(stem for stem, kind in kinds.items() if kind == SAME)
    if alike:
        shown = ", ".join(alike[:20]) + (f" and {len(alike) - 20} more" if len(alike) > 20 else "")
        ctx.warn(f"{len(alike)} pair(s) got the same description before and after (or none after), so their "
                 f"instruction only describes the after image: {shown}; write these instructions by hand")


def _descriptions(before: dict[str, str], after: dict[str, str]) -> dict[str, dict[str, str]]:
    return {stem: {"before": before.get(stem, ""), "after": text} for stem, text in sorted(after.items())}
