"""gRPC edge of the captioning service: validate, fill defaults, queue; caption review calls are
answered at once from the store (review.py)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from fluxlora.captioning import review
from fluxlora.captioning.captioners.base import known_captioners
from fluxlora.captioning.cleaning import POSITIONS, STYLES, validate_trigger
from fluxlora.captioning.defaults import DEFAULTS, PAIR_STYLE
from fluxlora.captioning.model_tokenizers import counters_for
from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.limits import Bound, check_caption_lengths, check_numbers, check_text_length
from fluxlora.common.models import check_model_ref
from fluxlora.domain.caption_versions import CaptionVersion, version_key
from fluxlora.domain.datasets import is_pair_dataset, require_dataset
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.models.single_file import text_model_folder
from fluxlora_api.shared.errors import InvalidArgument, NotFound
from fluxlora_api.v1 import captioning_pb2 as pb
from fluxlora_api.v1 import captioning_pb2_grpc

TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
# Every numeric CaptionSpec field (fluxlora.common.limits.check_numbers).
BOUNDS = {
    "batch_size": Bound(0, 64, f"0 means {DEFAULTS.batch_size}; every image of a batch and its activations are "
                        "in memory at once"),
    "max_new_tokens": Bound(0, 512, f"0 means {DEFAULTS.max_new_tokens}; FLUX's T5 text encoder reads at most "
                            "512 tokens of a caption"),
}


class CaptioningServicer(captioning_pb2_grpc.CaptioningServiceServicer):
    def __init__(self, runtime: JobRuntime):
        self.runtime = runtime

    @property
    def store(self):
        return self.runtime.store

    @grpc_errors
    def SubmitCaption(self, request, context):
        spec = pb.CaptionSpec()
        spec.CopyFrom(request.spec)
        check_numbers(spec, BOUNDS)
        require_dataset(self.store, spec.dataset_id)
        try:
            spec.trigger_word = validate_trigger(spec.trigger_word)
        except ValueError as exc:
            raise InvalidArgument(f"spec.trigger_word: {exc}") from exc
        spec.captioner = spec.captioner or DEFAULTS.captioner
        if spec.captioner not in known_captioners():
            raise InvalidArgument(f"unknown captioner {spec.captioner!r}; choose one of {known_captioners()}")
        spec.task = spec.task or DEFAULTS.task
        if spec.task not in TASKS:
            raise InvalidArgument(f"unknown task {spec.task!r}; choose one of {TASKS}")
        if spec.captioner != "florence2" and spec.task != "<CAPTION>":
            raise InvalidArgument(
                f"task {spec.task!r} is a Florence-2 prompt; the {spec.captioner} captioner takes none"
            )
        spec.trigger_position = spec.trigger_position or DEFAULTS.trigger_position
        if spec.trigger_position not in POSITIONS:
            raise InvalidArgument(f"trigger_position must be one of {POSITIONS}, not {spec.trigger_position!r}")
        _check_style(spec, is_pair_dataset(self.store, spec.dataset_id))
        if spec.batch_size < 0 or spec.max_new_tokens < 0:
            raise InvalidArgument("batch_size and max_new_tokens must be >= 0")
        spec.batch_size = spec.batch_size or DEFAULTS.batch_size
        spec.max_new_tokens = spec.max_new_tokens or DEFAULTS.max_new_tokens
        if spec.captioner == "import":
            self._check_captions_source(spec.captions_source)
        else:
            if spec.captions_source:
                raise InvalidArgument("spec.captions_source is only used by the 'import' captioner")
            spec.model = spec.model or self.runtime.settings.caption_model
            check_model_ref(spec.model, self.store, "captioning model")
        spec.base_model = text_model_folder(spec.base_model or self.runtime.settings.base_model,
                                            self.runtime.settings)
        if spec.base_model:
            check_model_ref(spec.base_model, self.store, "base model (for its tokenizers)")
        return self.runtime.submit(spec, request.request_id, request.webhook_urls)

    def _check_captions_source(self, source: str) -> None:
        if not source:
            return
        if source.endswith("/"):
            if next(iter(self.store.list(source)), None) is None:
                raise NotFound(f"spec.captions_source {source!r}: the store has no objects under that prefix")
        elif not self.store.exists(source):
            raise NotFound(f"spec.captions_source {source!r} not found in the store: upload the caption file first")

    @grpc_errors
    def ListCaptions(self, request, context):
        listing = review.list_captions(self.store, _dataset(request), request.version, request.include_urls)
        return pb.ListCaptionsResponse(
            version=_info(listing.version, request.dataset_id),
            entries=[pb.CaptionEntry(**entry) for entry in listing.entries],
            head_version=listing.head_version,
            approved_version=listing.approved_version,
        )

    @grpc_errors
    def EditCaptions(self, request, context):
        check_caption_lengths(request.captions, self.runtime.settings.max_caption_chars, "captions")
        change = review.edit_captions(
            self.store, _dataset(request), dict(request.captions), base_version=request.base_version,
            author=request.author, comment=request.comment, counters=self._counters(),
        )
        return _change(change, request.dataset_id)

    @grpc_errors
    def ReplaceInCaptions(self, request, context):
        limit = self.runtime.settings.max_caption_chars
        check_text_length(request.find, limit, "find")
        check_text_length(request.replace, limit, "replace")
        change = review.replace_in_captions(
            self.store, _dataset(request), request.find, request.replace, regex=request.regex,
            substring=request.substring, case_sensitive=request.case_sensitive, stems=list(request.stems),
            base_version=request.base_version, author=request.author, comment=request.comment,
            dry_run=request.dry_run, counters=self._counters(), max_caption_chars=limit,
        )
        return _change(change, request.dataset_id)

    @grpc_errors
    def ApproveCaptions(self, request, context):
        change = review.approve(
            self.store, _dataset(request), request.version, author=request.author, comment=request.comment,
            fix_triggers=request.fix_triggers, counters=self._counters(),
        )
        return _change(change, request.dataset_id)

    @grpc_errors
    def GetCaptionHistory(self, request, context):
        versions, head, approved = review.history(self.store, _dataset(request))
        return pb.CaptionHistory(
            versions=[_info(v, request.dataset_id) for v in versions], head_version=head, approved_version=approved
        )

    @grpc_errors
    def ExportCaptions(self, request, context):
        version, info = review.export_zip(self.store, _dataset(request), request.version, request.repeats)
        return pb.ExportCaptionsResponse(
            zip_key=info.key, zip_url=self.store.presigned_url(info.key), image_count=len(version.captions),
            version=version.version, size_bytes=info.size, sha256=info.sha256,
        )

    def _counters(self):
        settings = self.runtime.settings
        return counters_for(text_model_folder(settings.base_model, settings), self.store, settings.cache_dir)[0]


def _check_style(spec: pb.CaptionSpec, paired: bool) -> None:
    """Fills in the style: instructions for an editing dataset's generated captions, else the default.
    Instructions need before/after pairs and a captioner that looks at them."""
    imported = spec.captioner == "import"
    spec.style = spec.style or (PAIR_STYLE if paired and not imported else DEFAULTS.style)
    styles = (*STYLES, PAIR_STYLE)
    if spec.style not in styles:
        raise InvalidArgument(f"spec.style must be one of {styles}, not {spec.style!r}")
    if spec.style == PAIR_STYLE and not paired:
        raise InvalidArgument(
            f"spec.style {PAIR_STYLE!r} writes edit instructions from before/after pairs, and dataset "
            f"{spec.dataset_id!r} is not an editing dataset (its manifest has no \"paired\": true): use "
            f"{DEFAULTS.style!r} or 'tags', or preprocess the photos with their before images "
            "(<name>_control.<ext> beside each, or a control/ folder)"
        )
    if spec.style == PAIR_STYLE and imported:
        raise InvalidArgument(
            f"spec.style {PAIR_STYLE!r} describes each before and after image with a captioning model; the "
            "'import' captioner takes your captions as written: leave spec.style unset (imported captions "
            "of an editing dataset are its instructions) or pick another captioner"
        )


def _dataset(request) -> str:
    if not request.dataset_id.strip():
        raise InvalidArgument("dataset_id is empty: pass the id of a captioned dataset")
    return request.dataset_id


def _info(version: CaptionVersion, dataset_id: str) -> pb.CaptionVersionInfo:
    created = Timestamp()
    created.FromJsonString(version.created_at)
    return pb.CaptionVersionInfo(
        version=version.version, parent=version.parent, kind=version.kind, author=version.author,
        comment=version.comment, created_at=created, approved=version.approved, trigger_word=version.trigger_word,
        caption_count=len(version.captions), changed_stems=version.changed_stems, sha256=version.sha256,
        key=version_key(dataset_id, version.version),
    )


def _change(change: review.Change, dataset_id: str) -> pb.CaptionChange:
    return pb.CaptionChange(
        version=_info(change.version, dataset_id), created=change.created, changed_stems=change.changed_stems,
        warnings=change.warnings,
    )
