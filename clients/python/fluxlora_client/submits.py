"""Submitting jobs: typed calls whose options are the spec messages' fields (unset ones take the
server's defaults), each with a fresh request_id unless one is given (a retried submit is one job),
and optionally webhook_urls: URLs that receive the job's events as signed Standard Webhooks (the
server must hold FLUXLORA_WEBHOOK_SECRET; receivers check them with fluxlora_client.webhooks.verify)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from fluxlora_api.shared.options import build_message
from fluxlora_api.v1 import captioning_pb2, evaluation_pb2, jobs_pb2, preprocessing_pb2, training_pb2
from fluxlora_client import uploads
from fluxlora_client.connection import ServiceConnections
from fluxlora_client.errors import FluxloraClientError

# A training submit or plan is answered once the server has planned the run's GPU memory: a few fake
# training steps on its CPU (seconds each, longer on a loaded server), queued behind other clients'
# plans. Those calls get this much longer than the client's timeout.
PLANNING_ALLOWANCE_S = 240.0


class JobSubmits(ServiceConnections):
    def preprocess(self, source_prefix: str, base_size: int = 0, crop_mode: str = "", lora_type: str = "",
                   request_id: str | None = None, *, webhook_urls: Sequence[str] = (),
                   **options: Any) -> jobs_pb2.Job:
        """Options are PreprocessSpec fields; unset ones (0, "", None) take the server's defaults.
        crop_mode: bucket, square, subject (square on the salient region) or pad (whole photo,
        padded square). lora_type: concrete or style. background: "#rrggbb" behind transparency.
        min_side: 0 for the default floor. blur_threshold, monochrome_threshold: None for the default,
        0 to turn the check off; near_duplicate_distance: None for the default, -1 for off. Submit
        errors about the uploaded folder name the local folder upload_photos sent (uploads.localize)."""
        values = {"base_size": base_size, "crop_mode": crop_mode, "lora_type": lora_type, **options}
        spec = _spec(preprocessing_pb2.PreprocessSpec, source_prefix=source_prefix, **values)
        request = preprocessing_pb2.SubmitPreprocessRequest(spec=spec, request_id=request_id or _new_id(),
                                   webhook_urls=list(webhook_urls))
        try:
            return self._call(self._preprocessing.SubmitPreprocess, request)
        except FluxloraClientError as exc:  # "the uploaded folder holds ..." -> "your folder /home/... holds ..."
            exc.message = uploads.localize(exc.message, source_prefix)
            exc.args = (f"{exc.code}: {exc.message}",)
            raise

    def caption(self, dataset_id: str, trigger_word: str = "", request_id: str | None = None, *,
                webhook_urls: Sequence[str] = (), **options: Any) -> jobs_pb2.Job:
        """Auto-caption a dataset (a draft caption version; review and approve it with `captions`).

        Options are CaptionSpec fields (model, captioner, task, remove_phrases, batch_size,
        trigger_position, max_new_tokens, style, captions_source, base_model); unset ones take the
        server's defaults. captioner "import" takes existing captions instead: .txt/.csv/.jsonl uploaded
        with the photos, or the object key / prefix captions_source. style: "natural", "tags" or, for a
        before/after pair dataset (its default), "instruction": edit instructions written from both images.
        base_model: a FLUX model whose tokenizers count caption tokens (default: the service's)."""
        spec = _spec(captioning_pb2.CaptionSpec, dataset_id=dataset_id, trigger_word=trigger_word, **options)
        request = captioning_pb2.SubmitCaptionRequest(spec=spec, request_id=request_id or _new_id(),
                                   webhook_urls=list(webhook_urls))
        return self._call(self._captioning.SubmitCaption, request)

    def train(self, dataset_id: str, base_model: str = "", request_id: str | None = None, *,
              webhook_urls: Sequence[str] = (), **options: Any) -> jobs_pb2.Job:
        """Options are TrainSpec fields: resolution, max_steps, learning_rate, rank, alpha,
        batch_size, seed, checkpoint_every, sample_every, sample_prompts, guidance, precision,
        gradient_checkpointing, ... A run too big for the server's GPU raises FluxloraClientError
        RESOURCE_EXHAUSTED naming the options that would fit."""
        spec = _spec(training_pb2.TrainSpec, dataset_id=dataset_id, base_model=base_model, **options)
        request = training_pb2.SubmitTrainingRequest(spec=spec, request_id=request_id or _new_id(),
                                   webhook_urls=list(webhook_urls))
        return self._call(self._training.SubmitTraining, request, self.timeout + PLANNING_ALLOWANCE_S)

    def resume_training(self, run_id: str, request_id: str | None = None, *, webhook_urls: Sequence[str] = (),
                        **options: Any) -> jobs_pb2.Job:
        """A new job that continues the FAILED or CANCELLED training run `run_id` (a job id such as
        "trn-0123456789ab") from its last stored checkpoint, with that run's spec, in the same run
        (its result names `run_id`). Options may raise max_steps; others must equal the run's."""
        spec = training_pb2.TrainSpec(resume_from_run=run_id, **options)
        request = training_pb2.SubmitTrainingRequest(spec=spec, request_id=request_id or _new_id(),
                                   webhook_urls=list(webhook_urls))
        return self._call(self._training.SubmitTraining, request, self.timeout + PLANNING_ALLOWANCE_S)

    def plan_training(self, base_model: str = "", target_gib: float = 0.0, dataset_id: str = "",
                      **options: Any) -> training_pb2.TrainingPlan:
        """The memory plan of a run without queueing it: estimated peak GPU memory (computed on the
        server's CPU in seconds, no weights loaded), whether it fits target_gib (0: the server's GPU
        target) and, if not, the option changes that would. Options are TrainSpec fields."""
        spec = _spec(training_pb2.TrainSpec, dataset_id=dataset_id, base_model=base_model, **options)
        request = training_pb2.PlanTrainingRequest(spec=spec, target_gib=target_gib)
        return self._call(self._training.PlanTraining, request, self.timeout + PLANNING_ALLOWANCE_S)

    def evaluate(self, run_id: str, strengths: list[float] | None = None, request_id: str | None = None, *,
                 webhook_urls: Sequence[str] = (), **options: Any) -> jobs_pb2.Job:
        """Options are GridSpec fields: checkpoint_steps, prompt, seed, width, height, steps, guidance,
        prompts / seeds (one grid per prompt and seed), rows_per_page, image_text_model ("none" to
        skip fidelity scores), skip_convergence, base_model, control_image (editing models: the stored
        image every cell edits), and loras=[{"key": "<.safetensors key>",
        "label": "v1"}, {"run_id": "trn-...", "step": 1500}] for rows of LoRA files instead of one
        run's checkpoints (run_id "" then). The result's `recommendation` is the pick."""
        spec = _spec(evaluation_pb2.GridSpec, run_id=run_id, strengths=strengths or [], **options)
        request = evaluation_pb2.SubmitGridRequest(spec=spec, request_id=request_id or _new_id(),
                                   webhook_urls=list(webhook_urls))
        return self._call(self._evaluation.SubmitGrid, request)

    def generate(self, prompts: str | list[str], loras: list[dict[str, Any]] | None = None,
                 request_id: str | None = None, *, webhook_urls: Sequence[str] = (), **options: Any) -> jobs_pb2.Job:
        """Images from the base model with LoRAs applied; the job's result is a GenerateResult.

        loras: [{"key": "<.safetensors key>", "strength": 0.8}] or [{"run_id": "trn-...", "step": 1500}]
        (step 0 or absent: the run's latest checkpoint; strength absent: 1.0). Options are GenerateSpec
        fields: seed, images_per_prompt, width, height, steps, guidance, base_model, control_image (editing
        models: the stored image every generation edits)."""
        spec = _spec(evaluation_pb2.GenerateSpec, prompts=[prompts] if isinstance(prompts, str) else list(prompts),
                     loras=loras or [], **options)
        request = evaluation_pb2.SubmitGenerateRequest(spec=spec, request_id=request_id or _new_id(),
                                   webhook_urls=list(webhook_urls))
        return self._call(self._evaluation.SubmitGenerate, request)


def _spec(message_type: type, **values: Any) -> Any:
    """The spec message holding the values given; None, "" and 0 leave a field unset (the server's
    default). Enum fields take their short names ("bucket"); a wrong name or field is INVALID_ARGUMENT."""
    try:
        return build_message(message_type, {k: v for k, v in values.items() if v is not None and v != ""})
    except (ValueError, TypeError) as err:
        raise FluxloraClientError("INVALID_ARGUMENT", str(err)) from None


def _new_id() -> str:
    return uuid.uuid4().hex

