"""Runs one captioning job: dataset images from the store -> captioner -> cleaned captions
(kohya-style <stem>.txt beside each image, plus captions.json) back in the store."""

from __future__ import annotations

import threading
from pathlib import Path

from fluxlora.captioning.captioners.base import Captioner, load_captioner
from fluxlora.captioning.dataset import caption_images, write_sidecars
from fluxlora.common import keys
from fluxlora.common.models import resolve_model
from fluxlora.jobs.context import JobContext, JobInterrupted
from fluxlora_api.v1 import captioning_pb2 as pb

_loaded: dict[tuple, Captioner] = {}
_load_lock = threading.Lock()


def cached_captioner(kind: str, model_dir: Path, task: str, batch_size: int, max_new_tokens: int,
                     device: str) -> Captioner:
    """Loads a captioner once per process: later jobs with the same model reuse it."""
    key = (kind, str(model_dir), task, batch_size, max_new_tokens, device)
    with _load_lock:
        if key not in _loaded:
            _loaded.clear()  # one model resident at a time; GPU memory is the scarce thing
            _loaded[key] = load_captioner(
                kind, model_dir, task=task, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
            )
        return _loaded[key]


def run_caption(ctx: JobContext, spec: pb.CaptionSpec) -> pb.CaptionResult:
    images_prefix = keys.dataset_images(spec.dataset_id)
    image_keys = [o.key for o in ctx.store.list(images_prefix) if o.key.endswith(".png")]
    local = []
    for i, key in enumerate(image_keys, 1):
        ctx.check_cancelled()
        local.append(ctx.store.get_file(key, ctx.scratch / "images" / key[len(images_prefix):]))
        ctx.progress("downloading images", i, len(image_keys), "image")

    ctx.progress("loading captioner", 0)
    model_dir = resolve_model(spec.model, ctx.store, ctx.settings.cache_dir, "captioning model")
    captioner = cached_captioner(
        spec.captioner, model_dir, spec.task, spec.batch_size, spec.max_new_tokens, ctx.settings.device
    )
    captions = caption_images(
        local,
        captioner,
        spec.trigger_word,
        remove_phrases=list(spec.remove_phrases),
        position=spec.trigger_position,
        batch_size=spec.batch_size,
        progress=lambda done, total: ctx.progress("captioning", done, total, "image"),
        should_stop=lambda: ctx.should_stop,
    )
    if ctx.should_stop:
        raise JobInterrupted(ctx.job_id)

    out_dir = ctx.scratch / "captions"
    write_sidecars(captions, out_dir)
    for path in sorted(out_dir.glob("*.txt")):
        ctx.store.put_file(images_prefix + path.name, path, "text/plain; charset=utf-8")
    # Written last: training accepts a dataset only once captions.json exists.
    info = ctx.store.put_json(keys.dataset_captions(spec.dataset_id), {
        "trigger_word": spec.trigger_word,
        "captioner": spec.captioner,
        "model": spec.model,
        "task": spec.task,
        "remove_phrases": list(spec.remove_phrases),
        "captions": captions,
    })
    ctx.add_artifact(info, "captions")
    return pb.CaptionResult(
        dataset_id=spec.dataset_id,
        caption_count=len(captions),
        captions_key=keys.dataset_captions(spec.dataset_id),
    )
