"""The fluxlora Python SDK: typed calls to the four services, job watching with progress
callbacks, and upload/download helpers that talk to the artifact store directly.

    client = FluxloraClient.from_env()
    source = client.upload_photos("photos/")
    job = client.wait(client.preprocess(source, base_size=1024))
    dataset_id = client.result(job).dataset_id
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from fluxlora.common.auth import AuthConfigError, BearerTokenInterceptor, channel_credentials, load_auth_token
from fluxlora.common.config import DEFAULT_PORTS, Settings
from fluxlora.common.errors import ResourceExhausted
from fluxlora.common.limits import check_upload_bytes
from fluxlora.common.storage import ArtifactStore, open_store, sha256_file
from fluxlora_api.v1 import (
    captioning_pb2,
    captioning_pb2_grpc,
    evaluation_pb2,
    evaluation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    preprocessing_pb2,
    preprocessing_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from fluxlora_client.errors import FluxloraClientError, JobCancelled, JobFailed

if TYPE_CHECKING:
    from fluxlora_client.captions import CaptionReview

S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)
PREFIX_TO_SERVICE = {"pre": "preprocessing", "cap": "captioning", "trn": "training", "evl": "evaluation"}
RESULT_TYPES = {
    "preprocessing": preprocessing_pb2.PreprocessResult,
    "captioning": captioning_pb2.CaptionResult,
    "training": training_pb2.TrainResult,
    "evaluation": evaluation_pb2.GridResult,
}
RESULT_BY_NAME = {t.DESCRIPTOR.full_name: t for t in [*RESULT_TYPES.values(), evaluation_pb2.GenerateResult]}
CROP_MODES = {"bucket": preprocessing_pb2.CROP_MODE_BUCKET, "square": preprocessing_pb2.CROP_MODE_SQUARE,
              "subject": preprocessing_pb2.CROP_MODE_SUBJECT, "pad": preprocessing_pb2.CROP_MODE_PAD}
LORA_TYPES = {"concrete": preprocessing_pb2.LORA_TYPE_CONCRETE, "style": preprocessing_pb2.LORA_TYPE_STYLE}

# Retry UNAVAILABLE (a service restarting) on idempotent calls; submits carry a request_id.
_SERVICE_CONFIG = """{"methodConfig": [{"name": [{"service": "fluxlora.v1.JobService"},
  {"service": "fluxlora.v1.PreprocessingService"}, {"service": "fluxlora.v1.CaptioningService"},
  {"service": "fluxlora.v1.TrainingService"}, {"service": "fluxlora.v1.EvaluationService"}],
  "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "3s",
  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"""


@dataclass
class _Endpoint:
    channel: grpc.Channel
    jobs: jobs_pb2_grpc.JobServiceStub


class FluxloraClient:
    def __init__(
        self,
        store: ArtifactStore,
        preprocessing: str = f"localhost:{DEFAULT_PORTS['preprocessing']}",
        captioning: str = f"localhost:{DEFAULT_PORTS['captioning']}",
        training: str = f"localhost:{DEFAULT_PORTS['training']}",
        evaluation: str = f"localhost:{DEFAULT_PORTS['evaluation']}",
        timeout: float = 60.0,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_upload_bytes: int | None = None,
    ):
        """token: sent as `authorization: Bearer <token>` on every call; credentials: TLS
        (grpc.ssl_channel_credentials; from_env builds them from FLUXLORA_TLS_CA_FILE). max_upload_bytes:
        upload_photos refuses bigger uploads before sending a byte (from_env: FLUXLORA_MAX_UPLOAD_BYTES);
        the preprocessing server checks its own limit at submit either way."""
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        self.timeout = timeout
        self._interceptors = [BearerTokenInterceptor(token)] if token else []
        self._credentials = credentials
        self.addresses = {"preprocessing": preprocessing, "captioning": captioning,
                          "training": training, "evaluation": evaluation}
        self._endpoints: dict[str, _Endpoint] = {}
        self._preprocessing = preprocessing_pb2_grpc.PreprocessingServiceStub(self._channel("preprocessing"))
        self._captioning = captioning_pb2_grpc.CaptioningServiceStub(self._channel("captioning"))
        self._training = training_pb2_grpc.TrainingServiceStub(self._channel("training"))
        self._evaluation = evaluation_pb2_grpc.EvaluationServiceStub(self._channel("evaluation"))

    @classmethod
    def from_env(cls, settings: Settings | None = None, **addresses: str) -> FluxloraClient:
        """Store from FLUXLORA_STORE (and S3 settings); addresses from FLUXLORA_<SERVICE>_ADDR; token
        from FLUXLORA_AUTH_TOKEN or _FILE; TLS from FLUXLORA_TLS_CA_FILE (+ _CLIENT_CERT/KEY_FILE)."""
        import os

        settings = settings or Settings()
        for name, port in DEFAULT_PORTS.items():
            addresses.setdefault(name, os.environ.get(f"FLUXLORA_{name.upper()}_ADDR", f"localhost:{port}"))
        try:
            token, credentials = load_auth_token(settings), channel_credentials(settings)
        except AuthConfigError as err:
            raise FluxloraClientError("INVALID_ARGUMENT", str(err)) from None
        return cls(open_store(settings), **addresses, token=token, credentials=credentials,
                   max_upload_bytes=settings.max_upload_bytes)

    def _channel(self, service: str) -> grpc.Channel:
        if service not in self._endpoints:
            options = [("grpc.service_config", _SERVICE_CONFIG)]
            address = self.addresses[service]
            channel = (grpc.secure_channel(address, self._credentials, options=options) if self._credentials
                       else grpc.insecure_channel(address, options=options))
            channel = grpc.intercept_channel(channel, *self._interceptors)
            self._endpoints[service] = _Endpoint(channel, jobs_pb2_grpc.JobServiceStub(channel))
        return self._endpoints[service].channel

    def close(self) -> None:
        for endpoint in self._endpoints.values():
            endpoint.channel.close()

    def __enter__(self) -> FluxloraClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: Callable, request: Message, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise FluxloraClientError(err.code().name, err.details() or "") from None

    # --- uploads and downloads -------------------------------------------------------------
    def upload_photos(self, folder: str | Path) -> str:
        """Uploads every file of a folder (recursively) under uploads/<content hash>/ and returns
        that prefix. The same photos give the same prefix, so an upload is never stored twice.

        `folder` may also be a .zip of photos: it is uploaded as one object under the prefix and
        the preprocessing service unpacks it (and refuses it if an entry points outside it)."""
        folder = Path(folder)
        if folder.is_file() and folder.suffix.lower() == ".zip":
            files, folder = [folder], folder.parent
        elif folder.is_file():
            raise FluxloraClientError("INVALID_ARGUMENT", f"{folder} is a file: pass a folder of photos or a .zip")
        else:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FluxloraClientError("INVALID_ARGUMENT", f"{folder} holds no files")
        if self.max_upload_bytes:
            try:
                check_upload_bytes([p.stat().st_size for p in files], self.max_upload_bytes, str(folder))
            except ResourceExhausted as exc:
                raise FluxloraClientError(exc.code, exc.message) from None
        digest = hashlib.sha256()
        hashes = {}
        for path in files:
            rel = path.relative_to(folder).as_posix()
            hashes[rel] = sha256_file(path)
            digest.update(f"{rel}\0{hashes[rel]}\n".encode())
        prefix = f"uploads/u-{digest.hexdigest()[:16]}/"
        for path in files:
            key = prefix + path.relative_to(folder).as_posix()
            if not (self.store.exists(key) and self.store.stat(key).size == path.stat().st_size):
                self.store.put_file(key, path)
        return prefix

    def download(self, prefix_or_key: str, dest: str | Path) -> list[Path]:
        """Downloads one object (to dest/<name>) or every object under a prefix ending in '/'."""
        dest = Path(dest)
        if prefix_or_key.endswith("/"):
            return self.store.download_prefix(prefix_or_key, dest)
        return [self.store.get_file(prefix_or_key, dest / prefix_or_key.rsplit("/", 1)[-1])]

    # --- submitting ------------------------------------------------------------------------
    def preprocess(self, source_prefix: str, base_size: int = 1024, crop_mode: str = "bucket",
                   lora_type: str = "concrete", request_id: str | None = None, *, background: str = "",
                   min_side: int = 0, blur_threshold: float | None = None) -> jobs_pb2.Job:
        """crop_mode: bucket, square, subject (square on the salient region) or pad (whole photo,
        padded square). background: "#rrggbb" behind transparency. min_side: 0 for the default
        floor. blur_threshold: None for the default, 0 to turn the blur check off."""
        spec = preprocessing_pb2.PreprocessSpec(
            source_prefix=source_prefix, base_size=base_size,
            crop_mode=_choice(CROP_MODES, crop_mode, "crop_mode"),
            lora_type=_choice(LORA_TYPES, lora_type, "lora_type"),
            background=background, min_side=min_side, blur_threshold=blur_threshold,
        )
        request = preprocessing_pb2.SubmitPreprocessRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._preprocessing.SubmitPreprocess, request)

    def caption(self, dataset_id: str, trigger_word: str, model: str = "", captioner: str = "florence2",
                task: str = "<CAPTION>", remove_phrases: list[str] | tuple[str, ...] = (),
                batch_size: int = 0, trigger_position: str = "start", max_new_tokens: int = 0,
                request_id: str | None = None, *, style: str = "natural", captions_source: str = "",
                base_model: str = "") -> jobs_pb2.Job:
        """Auto-caption a dataset (a draft caption version; review and approve it with `captions`).

        captioner "import" takes existing captions instead: .txt/.csv/.jsonl uploaded with the photos,
        or the object key / prefix captions_source. style: "natural" or "tags". base_model: a FLUX
        model whose tokenizers count caption tokens (default: the service's)."""
        spec = captioning_pb2.CaptionSpec(
            dataset_id=dataset_id, trigger_word=trigger_word, captioner=captioner, model=model, task=task,
            batch_size=batch_size, remove_phrases=list(remove_phrases), trigger_position=trigger_position,
            max_new_tokens=max_new_tokens, style=style, captions_source=captions_source, base_model=base_model,
        )
        request = captioning_pb2.SubmitCaptionRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._captioning.SubmitCaption, request)

    def train(self, dataset_id: str, base_model: str = "", request_id: str | None = None,
              **options: Any) -> jobs_pb2.Job:
        """Options are TrainSpec fields: resolution, max_steps, learning_rate, rank, alpha,
        batch_size, seed, checkpoint_every, sample_every, sample_prompts, guidance, precision,
        gradient_checkpointing, ... A run too big for the server's GPU raises FluxloraClientError
        RESOURCE_EXHAUSTED naming the options that would fit."""
        spec = training_pb2.TrainSpec(dataset_id=dataset_id, base_model=base_model, **options)
        request = training_pb2.SubmitTrainingRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._training.SubmitTraining, request)

    def resume_training(self, run_id: str, request_id: str | None = None, **options: Any) -> jobs_pb2.Job:
        """A new job that continues the FAILED or CANCELLED training run `run_id` (a job id such as
        "trn-0123456789ab") from its last stored checkpoint, with that run's spec, in the same run
        (its result names `run_id`). Options may raise max_steps; others must equal the run's."""
        spec = training_pb2.TrainSpec(resume_from_run=run_id, **options)
        request = training_pb2.SubmitTrainingRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._training.SubmitTraining, request)

    def plan_training(self, base_model: str = "", target_gib: float = 0.0, dataset_id: str = "",
                      **options: Any) -> training_pb2.TrainingPlan:
        """The memory plan of a run without queueing it: estimated peak GPU memory (computed on the
        server's CPU in seconds, no weights loaded), whether it fits target_gib (0: the server's GPU
        target) and, if not, the option changes that would. Options are TrainSpec fields."""
        spec = training_pb2.TrainSpec(dataset_id=dataset_id, base_model=base_model, **options)
        request = training_pb2.PlanTrainingRequest(spec=spec, target_gib=target_gib)
        return self._call(self._training.PlanTraining, request)

    def evaluate(self, run_id: str, strengths: list[float] | None = None, request_id: str | None = None,
                 **options: Any) -> jobs_pb2.Job:
        """Options are GridSpec fields: checkpoint_steps, prompt, seed, width, height, steps, guidance,
        prompts / seeds (one grid per prompt and seed), rows_per_page, image_text_model ("none" to
        skip fidelity scores), skip_convergence, base_model, and loras=[{"key": "<.safetensors key>",
        "label": "v1"}, {"run_id": "trn-...", "step": 1500}] for rows of LoRA files instead of one
        run's checkpoints (run_id "" then). The result's `recommendation` is the pick."""
        spec = evaluation_pb2.GridSpec(run_id=run_id, strengths=strengths or [], **options)
        request = evaluation_pb2.SubmitGridRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._evaluation.SubmitGrid, request)

    def generate(self, prompts: str | list[str], loras: list[dict[str, Any]] | None = None,
                 request_id: str | None = None, **options: Any) -> jobs_pb2.Job:
        """Images from the base model with LoRAs applied; the job's result is a GenerateResult.

        loras: [{"key": "<.safetensors key>", "strength": 0.8}] or [{"run_id": "trn-...", "step": 1500}]
        (step 0 or absent: the run's latest checkpoint; strength absent: 1.0). Options are GenerateSpec
        fields: seed, images_per_prompt, width, height, steps, guidance, base_model."""
        spec = evaluation_pb2.GenerateSpec(
            prompts=[prompts] if isinstance(prompts, str) else list(prompts),
            loras=[evaluation_pb2.LoraWeight(**lora) for lora in loras or []], **options,
        )
        request = evaluation_pb2.SubmitGenerateRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._evaluation.SubmitGenerate, request)

    @functools.cached_property
    def captions(self) -> CaptionReview:
        """Caption review: list, edit, replace, approve, history, export, HTML review page (captions.py)."""
        from fluxlora_client.captions import CaptionReview

        return CaptionReview(self)

    # --- jobs ------------------------------------------------------------------------------
    def _jobs(self, job_id: str) -> jobs_pb2_grpc.JobServiceStub:
        service = PREFIX_TO_SERVICE.get(job_id.split("-", 1)[0])
        if service is None:
            raise FluxloraClientError("INVALID_ARGUMENT", f"{job_id!r} is not a fluxlora job id")
        self._channel(service)
        return self._endpoints[service].jobs

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs(job_id).GetJob, jobs_pb2.GetJobRequest(job_id=job_id))

    def list_jobs(self, service: str, states: list[int] | None = None, page_size: int = 0,
                  limit: int = 100) -> list[jobs_pb2.Job]:
        """A service's newest `limit` jobs (0: all of them), newest first, `page_size` per ListJobs call
        (0: `limit`, at most the server's 500)."""
        pages = self.iter_jobs(service, states, page_size or min(limit, 500))
        return list(itertools.islice(pages, limit or None))

    def iter_jobs(self, service: str, states: list[int] | None = None, page_size: int = 0) -> Iterator[jobs_pb2.Job]:
        """Every job of a service, newest first, asking for the next page only when the last is used up."""
        if service not in self.addresses:
            raise FluxloraClientError(
                "INVALID_ARGUMENT", f"unknown service {service!r}; choose one of {', '.join(self.addresses)}"
            )
        self._channel(service)
        token = ""
        while True:
            request = jobs_pb2.ListJobsRequest(states=states or [], page_size=page_size, page_token=token)
            reply = self._call(self._endpoints[service].jobs.ListJobs, request)
            yield from reply.jobs
            token = reply.next_page_token
            if not token:
                return

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs(job_id).CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id))

    def watch(self, job_id: str) -> Iterator[jobs_pb2.JobEvent]:
        """Streams the job's events until it finishes, reconnecting if the stream drops. A server with
        all its watch streams taken (RESOURCE_EXHAUSTED, FLUXLORA_MAX_WATCHERS) is polled with GetJob
        instead: those events carry sequence 0 and come only when the job changed."""
        while True:
            try:
                for event in self._jobs(job_id).WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
                    yield event
                    if event.job.state in TERMINAL:
                        return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    yield from self._poll(job_id)
                    return
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise FluxloraClientError(err.code().name, err.details() or "") from None
            if self.get_job(job_id).state in TERMINAL:
                return

    def _poll(self, job_id: str, first_s: float = 0.2, max_s: float = 2.0) -> Iterator[jobs_pb2.JobEvent]:
        delay, last = first_s, None
        while True:
            job = self.get_job(job_id)
            if job != last:
                last, delay = job, first_s
                event = jobs_pb2.JobEvent(job=job, message="polled (the server's watch streams are all in use)")
                event.time.GetCurrentTime()
                yield event
            if job.state in TERMINAL:
                return
            time.sleep(delay)
            delay = min(max_s, delay * 1.5)

    def wait(self, job: jobs_pb2.Job | str, on_event: Callable[[jobs_pb2.JobEvent], None] | None = None,
             raise_on_failure: bool = True) -> jobs_pb2.Job:
        """Blocks until the job finishes; raises JobFailed / JobCancelled unless told not to."""
        job_id = job if isinstance(job, str) else job.job_id
        final = None
        for event in self.watch(job_id):
            if on_event:
                on_event(event)
            final = event.job
        final = final if final is not None and final.state in TERMINAL else self.get_job(job_id)
        if raise_on_failure and final.state == S.JOB_STATE_FAILED:
            raise JobFailed(final.error.code, final.error.message, final)
        if raise_on_failure and final.state == S.JOB_STATE_CANCELLED:
            raise JobCancelled("CANCELLED", f"job {job_id} was cancelled", final)
        return final

    def result(self, job: jobs_pb2.Job) -> Any:
        """The job's typed result (PreprocessResult, CaptionResult, TrainResult or GridResult)."""
        # The evaluation service has two result types (GridResult, GenerateResult): go by the payload.
        message = RESULT_BY_NAME.get(job.result.TypeName(), RESULT_TYPES[job.service])()
        if not job.result.Unpack(message):
            raise FluxloraClientError("FAILED_PRECONDITION", f"job {job.job_id} has no result yet")
        return message

    def spec(self, job: jobs_pb2.Job) -> Any:
        name = job.spec.TypeName().rsplit(".", 1)[-1]
        module = {"PreprocessSpec": preprocessing_pb2, "CaptionSpec": captioning_pb2,
                  "TrainSpec": training_pb2, "GridSpec": evaluation_pb2, "GenerateSpec": evaluation_pb2}[name]
        message = getattr(module, name)()
        job.spec.Unpack(message)
        return message


def _choice(table: dict[str, int], value: str, field: str) -> int:
    if value not in table:
        raise FluxloraClientError("INVALID_ARGUMENT", f"{field} must be one of {sorted(table)}, not {value!r}")
    return table[value]


def _new_id() -> str:
    return uuid.uuid4().hex
