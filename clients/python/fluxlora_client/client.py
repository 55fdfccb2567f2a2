"""The fluxlora Python SDK: typed calls to the four services, job watching with progress
callbacks, and upload/download helpers. The client holds no store credentials: the servers hand out
presigned, expiring URLs or stream the bytes over gRPC (fluxlora.v1.TransferService, transfers.py).

    client = FluxloraClient.from_env()
    source = client.upload_photos("photos/")
    job = client.wait(client.preprocess(source, base_size=1024))
    dataset_id = client.result(job).dataset_id
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from fluxlora_api.shared.auth import AuthConfigError, BearerTokenInterceptor, credentials_from_env
from fluxlora_api.shared.errors import ResourceExhausted
from fluxlora_api.shared.files import check_upload_bytes, sha256_file
from fluxlora_api.shared.options import build_message
from fluxlora_api.shared.ports import DEFAULT_PORTS, PREFIX_TO_SERVICE
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
    transfers_pb2,
    transfers_pb2_grpc,
)
from fluxlora_client import tracing, transfers
from fluxlora_client.errors import FluxloraClientError, JobCancelled, JobFailed

if TYPE_CHECKING:
    from fluxlora_client.captions import CaptionReview

S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)
RESULT_TYPES = {
    "preprocessing": preprocessing_pb2.PreprocessResult,
    "captioning": captioning_pb2.CaptionResult,
    "training": training_pb2.TrainResult,
    "evaluation": evaluation_pb2.GridResult,
}
RESULT_BY_NAME = {t.DESCRIPTOR.full_name: t for t in [*RESULT_TYPES.values(), evaluation_pb2.GenerateResult]}
# Which server a download goes through by default (any serves any readable key: they share one store);
# the one that wrote the key is the one a client talking to a single service has.
DOWNLOAD_SERVICE = {"uploads": "preprocessing", "datasets": "preprocessing", "runs": "training",
                    "grids": "evaluation", "generations": "evaluation"}
# A presigned URL this close to its expiry is not used: the client asks for fresh ones.
URL_MARGIN = datetime.timedelta(seconds=10)

# Retry UNAVAILABLE (a service restarting) on idempotent calls; submits carry a request_id.
_SERVICE_CONFIG = """{"methodConfig": [{"name": [{"service": "fluxlora.v1.JobService"},
  {"service": "fluxlora.v1.PreprocessingService"}, {"service": "fluxlora.v1.CaptioningService"},
  {"service": "fluxlora.v1.TrainingService"}, {"service": "fluxlora.v1.EvaluationService"},
  {"service": "fluxlora.v1.TransferService"}],
  "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "3s",
  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"""
# gRPC waits longer and longer between attempts to reach a server that went away (up to 2 minutes);
# capped, a restarted server is found again within seconds of coming back.
_CHANNEL_OPTIONS = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.initial_reconnect_backoff_ms", 500),
                    ("grpc.max_reconnect_backoff_ms", 3000)]
RECONNECT_FOR_S = 300.0  # how long watch/wait ride out a server that is down or restarting


@dataclass
class _Endpoint:
    channel: grpc.Channel
    jobs: jobs_pb2_grpc.JobServiceStub
    transfers: transfers_pb2_grpc.TransferServiceStub


class FluxloraClient:
    def __init__(
        self,
        preprocessing: str = f"localhost:{DEFAULT_PORTS['preprocessing']}",
        captioning: str = f"localhost:{DEFAULT_PORTS['captioning']}",
        training: str = f"localhost:{DEFAULT_PORTS['training']}",
        evaluation: str = f"localhost:{DEFAULT_PORTS['evaluation']}",
        timeout: float = 60.0,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_upload_bytes: int | None = None,
        reconnect_for_s: float = RECONNECT_FOR_S,
    ):
        """token: sent as `authorization: Bearer <token>` on every call; credentials: TLS
        (grpc.ssl_channel_credentials; from_env builds them from FLUXLORA_TLS_CA_FILE). max_upload_bytes:
        upload_photos refuses bigger uploads before sending a byte (from_env: FLUXLORA_MAX_UPLOAD_BYTES);
        the preprocessing server checks its own limit at CreateUpload either way. No store: uploads and
        downloads go through the servers (presigned URLs, or bytes streamed over gRPC). reconnect_for_s: how
        long watch and wait ride out a server that is down or restarting (0: give up at the first drop)."""
        self.reconnect_for_s = reconnect_for_s
        self.max_upload_bytes = max_upload_bytes
        self.timeout = timeout
        self._interceptors = [BearerTokenInterceptor(token)] if token else []
        self._interceptors += tracing.interceptors()  # OpenTelemetry, where the program has it
        self._credentials = credentials
        self.addresses = {"preprocessing": preprocessing, "captioning": captioning,
                          "training": training, "evaluation": evaluation}
        self._endpoints: dict[str, _Endpoint] = {}
        self._preprocessing = preprocessing_pb2_grpc.PreprocessingServiceStub(self._channel("preprocessing"))
        self._captioning = captioning_pb2_grpc.CaptioningServiceStub(self._channel("captioning"))
        self._training = training_pb2_grpc.TrainingServiceStub(self._channel("training"))
        self._evaluation = evaluation_pb2_grpc.EvaluationServiceStub(self._channel("evaluation"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **addresses: str) -> FluxloraClient:
        """Addresses from FLUXLORA_<SERVICE>_ADDR; token from FLUXLORA_AUTH_TOKEN or _FILE; TLS from
        FLUXLORA_TLS_CA_FILE (+ _CLIENT_CERT/KEY_FILE); FLUXLORA_MAX_UPLOAD_BYTES. `env`: these variables
        (default: this process's environment). Nothing about the store: the client needs no S3 credentials."""
        env = os.environ if env is None else env
        for name, port in DEFAULT_PORTS.items():
            addresses.setdefault(name, env.get(f"FLUXLORA_{name.upper()}_ADDR") or f"localhost:{port}")
        try:
            token, credentials = credentials_from_env(env)
        except AuthConfigError as err:
            raise FluxloraClientError("INVALID_ARGUMENT", str(err)) from None
        limit = env.get("FLUXLORA_MAX_UPLOAD_BYTES", "").strip()
        if limit and not limit.isdigit():
            raise FluxloraClientError("INVALID_ARGUMENT", f"FLUXLORA_MAX_UPLOAD_BYTES={limit!r} is not a byte count")
        return cls(**addresses, token=token, credentials=credentials, max_upload_bytes=int(limit) if limit else None)

    def _channel(self, service: str) -> grpc.Channel:
        if service not in self._endpoints:
            options = _CHANNEL_OPTIONS
            address = self.addresses[service]
            channel = (grpc.secure_channel(address, self._credentials, options=options) if self._credentials
                       else grpc.insecure_channel(address, options=options))
            channel = grpc.intercept_channel(channel, *self._interceptors)
            self._endpoints[service] = _Endpoint(channel, jobs_pb2_grpc.JobServiceStub(channel),
                                                 transfers_pb2_grpc.TransferServiceStub(channel))
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
    def _transfers(self, service: str) -> transfers_pb2_grpc.TransferServiceStub:
        self._channel(service)
        return self._endpoints[service].transfers

    def upload_photos(self, folder: str | Path, *, stream: bool = False) -> str:
        """Uploads every file of a folder (recursively) under uploads/u-<content hash>/ and returns
        that prefix. The same photos give the same prefix, so an upload is never stored twice.

        `folder` may also be a .zip of photos: it is uploaded as one object under the prefix and
        the preprocessing service unpacks it (and refuses it if an entry points outside it).
        The preprocessing server hands out a presigned URL per file (an S3 store) or takes the bytes
        over gRPC (the local store; also `stream=True`, or when the URL's host cannot be reached);
        it checks every file's size and sha256 before the prefix counts as complete."""
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
        local = {p.relative_to(folder).as_posix(): p for p in files}
        declared = [transfers_pb2.UploadFileSpec(path=rel, size=p.stat().st_size, sha256=sha256_file(p))
                    for rel, p in local.items()]
        stub = self._transfers("preprocessing")
        for _ in range(3):  # URLs about to expire (a long upload): ask again for the files still missing
            upload = self._call(stub.CreateUpload, transfers_pb2.CreateUploadRequest(files=declared, stream=stream))
            if upload.complete:
                return upload.upload_prefix
            if self._send(stub, upload, local):
                break
        self._call(stub.CompleteUpload, transfers_pb2.CompleteUploadRequest(upload_prefix=upload.upload_prefix))
        return upload.upload_prefix

    def _send(self, stub, upload: transfers_pb2.CreateUploadResponse, local: dict[str, Path]) -> bool:
        """Sends the upload's targets; False when a URL expired before its turn came."""
        for target in upload.targets:
            path = local[target.path]
            if upload.mode == transfers_pb2.TRANSFER_MODE_PRESIGNED:
                if target.expires_at.ToDatetime(datetime.UTC) - URL_MARGIN <= datetime.datetime.now(datetime.UTC):
                    return False
                try:
                    transfers.put_url(target.url, dict(target.headers), path, self.timeout)
                    continue
                except transfers.Unreachable:
                    pass  # the store is not reachable from here: the server takes the bytes instead
            timeout = transfers.transfer_timeout(self.timeout, path.stat().st_size)
            self._call(stub.UploadFile, transfers.upload_chunks(upload.upload_prefix, target.path, path), timeout)
        return True

    def list_artifacts(self, prefix_or_key: str, *, include_urls: bool = False,
                       service: str | None = None) -> list[transfers_pb2.Artifact]:
        """The objects under a prefix ending in '/' (or one key) that clients may read: datasets/, runs/,
        grids/, generations/ and uploads/; with presigned GET URLs where the store has them."""
        stub = self._transfers(service or self._download_service(prefix_or_key))
        artifacts, token = [], ""
        while True:
            request = transfers_pb2.ListArtifactsRequest(prefix=prefix_or_key, include_urls=include_urls,
                                                         page_token=token)
            reply = self._call(stub.ListArtifacts, request)
            artifacts.extend(reply.artifacts)
            token = reply.next_page_token
            if not token:
                return artifacts

    def download(self, prefix_or_key: str, dest: str | Path, *, service: str | None = None) -> list[Path]:
        """Downloads one object (to dest/<name>) or every object under a prefix ending in '/' (to
        dest/<path under the prefix>), through presigned URLs or streamed by the server; sizes checked.
        service: the server to ask (default: the one that writes such keys; any can serve any)."""
        dest = Path(dest)
        service = service or self._download_service(prefix_or_key)
        paths = []
        for artifact in self.list_artifacts(prefix_or_key, include_urls=True, service=service):
            relative = (artifact.key[len(prefix_or_key):] if prefix_or_key.endswith("/")
                        else artifact.key.rsplit("/", 1)[-1])
            paths.append(self._fetch(service, artifact, transfers.local_target(dest, relative)))
        return paths

    def _fetch(self, service: str, artifact: transfers_pb2.Artifact, target: Path) -> Path:
        if artifact.url:
            try:
                return transfers.get_url(artifact.url, artifact.key, artifact.size, target, self.timeout)
            except transfers.Unreachable:
                pass  # the store is not reachable from here: the server streams it instead
        stream = self._call(self._transfers(service).DownloadFile, transfers_pb2.DownloadFileRequest(key=artifact.key),
                            transfers.transfer_timeout(self.timeout, artifact.size))
        try:
            return transfers.write_stream(target, artifact.key, stream)
        except grpc.RpcError as err:
            raise FluxloraClientError(err.code().name, err.details() or "") from None

    def _download_service(self, prefix_or_key: str) -> str:
        return DOWNLOAD_SERVICE.get(prefix_or_key.split("/", 1)[0], "preprocessing")

    # --- submitting ------------------------------------------------------------------------
    def preprocess(self, source_prefix: str, base_size: int = 0, crop_mode: str = "", lora_type: str = "",
                   request_id: str | None = None, **options: Any) -> jobs_pb2.Job:
        """Options are PreprocessSpec fields; unset ones (0, "", None) take the server's defaults.
        crop_mode: bucket, square, subject (square on the salient region) or pad (whole photo,
        padded square). lora_type: concrete or style. background: "#rrggbb" behind transparency.
        min_side: 0 for the default floor. blur_threshold: None for the default, 0 to turn the blur
        check off."""
        values = {"base_size": base_size, "crop_mode": crop_mode, "lora_type": lora_type, **options}
        spec = _spec(preprocessing_pb2.PreprocessSpec, source_prefix=source_prefix, **values)
        request = preprocessing_pb2.SubmitPreprocessRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._preprocessing.SubmitPreprocess, request)

    def caption(self, dataset_id: str, trigger_word: str = "", request_id: str | None = None,
                **options: Any) -> jobs_pb2.Job:
        """Auto-caption a dataset (a draft caption version; review and approve it with `captions`).

        Options are CaptionSpec fields (model, captioner, task, remove_phrases, batch_size,
        trigger_position, max_new_tokens, style, captions_source, base_model); unset ones take the
        server's defaults. captioner "import" takes existing captions instead: .txt/.csv/.jsonl uploaded
        with the photos, or the object key / prefix captions_source. style: "natural" or "tags".
        base_model: a FLUX model whose tokenizers count caption tokens (default: the service's)."""
        spec = _spec(captioning_pb2.CaptionSpec, dataset_id=dataset_id, trigger_word=trigger_word, **options)
        request = captioning_pb2.SubmitCaptionRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._captioning.SubmitCaption, request)

    def train(self, dataset_id: str, base_model: str = "", request_id: str | None = None,
              **options: Any) -> jobs_pb2.Job:
        """Options are TrainSpec fields: resolution, max_steps, learning_rate, rank, alpha,
        batch_size, seed, checkpoint_every, sample_every, sample_prompts, guidance, precision,
        gradient_checkpointing, ... A run too big for the server's GPU raises FluxloraClientError
        RESOURCE_EXHAUSTED naming the options that would fit."""
        spec = _spec(training_pb2.TrainSpec, dataset_id=dataset_id, base_model=base_model, **options)
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
        spec = _spec(training_pb2.TrainSpec, dataset_id=dataset_id, base_model=base_model, **options)
        request = training_pb2.PlanTrainingRequest(spec=spec, target_gib=target_gib)
        return self._call(self._training.PlanTraining, request)

    def evaluate(self, run_id: str, strengths: list[float] | None = None, request_id: str | None = None,
                 **options: Any) -> jobs_pb2.Job:
        """Options are GridSpec fields: checkpoint_steps, prompt, seed, width, height, steps, guidance,
        prompts / seeds (one grid per prompt and seed), rows_per_page, image_text_model ("none" to
        skip fidelity scores), skip_convergence, base_model, and loras=[{"key": "<.safetensors key>",
        "label": "v1"}, {"run_id": "trn-...", "step": 1500}] for rows of LoRA files instead of one
        run's checkpoints (run_id "" then). The result's `recommendation` is the pick."""
        spec = _spec(evaluation_pb2.GridSpec, run_id=run_id, strengths=strengths or [], **options)
        request = evaluation_pb2.SubmitGridRequest(spec=spec, request_id=request_id or _new_id())
        return self._call(self._evaluation.SubmitGrid, request)

    def generate(self, prompts: str | list[str], loras: list[dict[str, Any]] | None = None,
                 request_id: str | None = None, **options: Any) -> jobs_pb2.Job:
        """Images from the base model with LoRAs applied; the job's result is a GenerateResult.

        loras: [{"key": "<.safetensors key>", "strength": 0.8}] or [{"run_id": "trn-...", "step": 1500}]
        (step 0 or absent: the run's latest checkpoint; strength absent: 1.0). Options are GenerateSpec
        fields: seed, images_per_prompt, width, height, steps, guidance, base_model."""
        spec = _spec(evaluation_pb2.GenerateSpec, prompts=[prompts] if isinstance(prompts, str) else list(prompts),
                     loras=loras or [], **options)
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

    def watch(self, job_id: str, reconnect_for_s: float | None = None) -> Iterator[jobs_pb2.JobEvent]:
        """Streams the job's events until it finishes: the terminal event comes exactly once and no
        event twice. A dropped stream or a server that is down or restarting is reconnected, with
        backoff and jitter, for up to `reconnect_for_s` seconds of outage (default: the client's
        reconnect_for_s, 300), resuming after the last event seen; past that FluxloraClientError
        UNAVAILABLE. A server with all its watch streams taken (RESOURCE_EXHAUSTED,
        FLUXLORA_MAX_WATCHERS) is polled with GetJob instead: those events carry sequence 0 and come
        only when the job changed."""
        limit = self.reconnect_for_s if reconnect_for_s is None else reconnect_for_s
        outage, seen = _Outage(job_id, limit), _Seen()
        stub = self._jobs(job_id)
        while True:
            try:
                request = jobs_pb2.WatchJobRequest(job_id=job_id, after_sequence=seen.sequence)
                for event in stub.WatchJob(request):
                    outage.over()
                    if seen.is_new(event):
                        yield event
                    if event.job.state in TERMINAL:
                        return
                why = "the stream ended before the job finished (the server is stopping)"
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    yield from self._poll(job_id, seen, outage)
                    return
                if err.code() not in _RECONNECT_ON:
                    raise FluxloraClientError(err.code().name, err.details() or "") from None
                why = f"{err.code().name}: {err.details()}"
            outage.wait(why)

    def _poll(self, job_id: str, seen: _Seen, outage: _Outage, first_s: float = 0.2,
              max_s: float = 2.0) -> Iterator[jobs_pb2.JobEvent]:
        delay = first_s
        while True:
            try:
                job = self.get_job(job_id)
            except FluxloraClientError as err:
                if err.code != "UNAVAILABLE":
                    raise
                outage.wait(f"{err.code}: {err.message}")
                continue
            outage.over()
            event = jobs_pb2.JobEvent(job=job, message="polled (the server's watch streams are all in use)")
            event.time.GetCurrentTime()
            if job != seen.job:
                seen.is_new(event)
                yield event
                delay = first_s
            if job.state in TERMINAL:
                return
            time.sleep(delay)
            delay = min(max_s, delay * 1.5)

    def wait(self, job: jobs_pb2.Job | str, on_event: Callable[[jobs_pb2.JobEvent], None] | None = None,
             raise_on_failure: bool = True, reconnect_for_s: float | None = None) -> jobs_pb2.Job:
        """Blocks until the job finishes, riding out server restarts as `watch` does; raises JobFailed /
        JobCancelled unless told not to."""
        job_id = job if isinstance(job, str) else job.job_id
        final = None
        for event in self.watch(job_id, reconnect_for_s=reconnect_for_s):
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


def _spec(message_type: type, **values: Any) -> Any:
    """The spec message holding the values given; None, "" and 0 leave a field unset (the server's
    default). Enum fields take their short names ("bucket"); a wrong name or field is INVALID_ARGUMENT."""
    try:
        return build_message(message_type, {k: v for k, v in values.items() if v is not None and v != ""})
    except (ValueError, TypeError) as err:
        raise FluxloraClientError("INVALID_ARGUMENT", str(err)) from None

def _new_id() -> str:
    return uuid.uuid4().hex


# A watch reconnects on these: the server is down or restarting (UNAVAILABLE), or it was stopped
# while the stream was open (CANCELLED comes from a server that shut down with the stream open).
_RECONNECT_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class _Seen:
    """The last event a watch delivered: its sequence (to resume after) and its job (to drop the
    repeat of the current state a resumed stream may start with)."""

    def __init__(self) -> None:
        self.sequence = 0
        self.job: jobs_pb2.Job | None = None

    def is_new(self, event: jobs_pb2.JobEvent) -> bool:
        self.sequence = event.sequence  # the server's numbering (a restarted server numbers afresh)
        if self.job is not None and event.job == self.job and not event.message:
            return False
        self.job = event.job
        return True


class _Outage:
    """How long a watch has been unable to reach its server, and the waits between its attempts:
    exponential backoff with full jitter, so the watchers of a restarted server do not return as one."""

    def __init__(self, job_id: str, limit_s: float, first_s: float = 0.25, max_s: float = 3.0):
        self.job_id, self.limit_s, self.first_s, self.max_s = job_id, limit_s, first_s, max_s
        self.since: float | None = None
        self.delay = first_s

    def over(self) -> None:
        self.since, self.delay = None, self.first_s

    def wait(self, why: str) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        left = self.since + self.limit_s - now
        if left <= 0:
            raise FluxloraClientError(
                "UNAVAILABLE", f"lost the server of job {self.job_id} and could not reach it again for "
                f"{self.limit_s:.0f} s (last: {why}); the job itself may still be running: watch it again "
                f"(fluxlora jobs watch {self.job_id}) or allow longer outages (reconnect_for_s)")
        time.sleep(min(left, random.uniform(self.delay / 2, self.delay)))
        self.delay = min(self.max_s, self.delay * 2)
