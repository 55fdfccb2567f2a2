"""Configuration shared by every server and the SDK: environment variables (FLUXLORA_*) and flags.

Secrets (S3 keys, the auth token) come only from the environment or files, never from flags, so they stay out of
process listings and shell history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fluxlora_api.shared.ports import DEFAULT_PORTS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXLORA_", extra="ignore")

    store: str = Field(
        "./fluxlora-data",
        description="Artifact store: a local directory (embedded default) or s3://<bucket>.",
    )
    s3_endpoint: str = Field("localhost:9000", description="host:port of the S3/MinIO endpoint.")
    s3_access_key: SecretStr = Field(SecretStr(""), description="S3 access key.")
    s3_secret_key: SecretStr = Field(SecretStr(""), description="S3 secret key.")
    s3_secure: bool = Field(False, description="Use HTTPS for the S3 endpoint.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    # Clients never hold the S3 keys: the servers hand them presigned URLs (fluxlora.common.transfers),
    # signed for the endpoint the clients reach, which in Compose or Kubernetes is not the one the servers use.
    s3_public_endpoint: str = Field(
        "", description="host:port or http(s)://host:port clients reach S3 at, for presigned URLs; empty: s3_endpoint."
    )
    presign_expiry_s: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="Seconds a presigned upload or download URL stays valid."
    )
    transfer_mode: Literal["auto", "stream"] = Field(
        "auto", description="Client uploads/downloads: auto (presigned URLs where the store has them) or stream "
                            "(always over gRPC through the server, for clients that cannot reach the store)."
    )
    # A transient S3 failure (connection refused/reset, timeout, 5xx, SlowDown) is retried after a delay
    # drawn from [0, min(max, base * 2^n)] (fluxlora.common.s3_retry); the defaults wait up to ~55 s
    # (~28 s on average) before the call fails with UNAVAILABLE.
    s3_retries: int = Field(10, ge=0, description="Retries of a transient S3 failure before UNAVAILABLE.")
    s3_retry_base_s: float = Field(0.5, gt=0, description="Backoff cap of the first S3 retry (doubles each retry).")
    s3_retry_max_s: float = Field(8.0, gt=0, description="Largest backoff cap between two S3 retries.")
    s3_timeout_s: float = Field(
        60.0, gt=0, description="Seconds an S3 request may wait for the endpoint (connect: at most 10) per attempt."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "fluxlora",
        description="Local mirror of models fetched from the store (store://<prefix>).",
    )
    # Credentials (fluxlora.common.auth): environment or files only; SecretStr keeps the token out of
    # repr() and logs. Servers use the token and TLS_CERT/KEY/CLIENT_CA; the SDK the token and TLS_CA/CLIENT_*.
    auth_token: SecretStr = Field(SecretStr(""), description="Bearer token every RPC must carry; empty: auth off.")
    auth_token_file: Path | None = Field(None, description="File holding the token (not with auth_token).")
    tls_cert_file: Path | None = Field(None, description="Server certificate chain (PEM); set with tls_key_file.")
    tls_key_file: Path | None = Field(None, description="Server private key (PEM).")
    tls_client_ca_file: Path | None = Field(None, description="CA whose client certificates the server requires.")
    tls_ca_file: Path | None = Field(None, description="SDK: CA to trust for the servers' certificates (TLS on).")
    tls_client_cert_file: Path | None = Field(None, description="SDK: client certificate (PEM) for mutual TLS.")
    tls_client_key_file: Path | None = Field(None, description="SDK: client private key (PEM) for mutual TLS.")
    # Failed-authentication lockout (fluxlora.common.auth_lockout): an address failing this often within the
    # window has every call refused (RESOURCE_EXHAUSTED, the right token too) for the lockout; 0 failures: off.
    auth_max_failures: int = Field(
        20, ge=0, description="Failed authentications from one address within the window before it is locked out."
    )
    auth_failure_window_s: float = Field(60.0, gt=0, description="Seconds over which failed authentications count.")
    auth_lockout_s: float = Field(60.0, gt=0, description="Seconds a locked-out address has every call refused.")
    auth_tracked_peers: int = Field(
        10_000, ge=1, description="Addresses the lockout remembers at most (the least recently seen is forgotten)."
    )
    health_port: int = Field(
        0, ge=0, description="Extra plaintext port serving only gRPC health (probes of TLS servers); 0: none."
    )
    # Observability (fluxlora.common.metrics, fluxlora.server.telemetry, fluxlora.jobs.webhooks).
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port serving Prometheus /metrics over HTTP; unset: off (0: any free port, for tests).",
    )
    metrics_host: str = Field("", description="Address /metrics binds to; empty: the server's host.")
    webhook_urls: list[str] = Field(
        default_factory=list, description="URLs (JSON list) that receive every job's events as Standard Webhooks."
    )
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="Standard Webhooks signing secret (whsec_<base64>); needed for any webhook."
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Where webhooks may go (JSON list of host patterns like *.example.com and networks like "
        "10.0.0.0/8); empty: anywhere but link-local and cloud-metadata addresses, which are always refused.",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="Seconds a webhook receiver may take to answer.")
    webhook_retry_for_s: float = Field(
        3600.0, gt=0, description="Seconds after an event within which its failed deliveries are retried."
    )
    webhook_retry_base_s: float = Field(1.0, gt=0, description="Backoff cap of the first webhook retry (doubles).")
    webhook_retry_max_s: float = Field(60.0, gt=0, description="Largest backoff cap between two webhook retries.")
    webhook_progress_interval_s: float = Field(
        10.0, ge=0, description="Least seconds between two job.progress webhooks of one job."
    )
    webhook_workers: int = Field(4, ge=1, description="Threads delivering webhooks (one job and URL at a time each).")
    host: str = Field("127.0.0.1", description="Address the server binds to.")
    port: int = Field(0, description="Port; 0 means the service's default port.")
    workers: int = Field(1, ge=1, description="Jobs a server runs at once (GPU services: 1).")
    max_queued_jobs: int = Field(64, ge=1, description="Queued jobs beyond which submits get RESOURCE_EXHAUSTED.")
    # Request limits (fluxlora.common.limits): each refusal names the field, the value, the limit and the setting.
    max_watchers: int = Field(
        64, ge=1, description="WatchJob streams one server holds at once; more get RESOURCE_EXHAUSTED (the SDK polls)."
    )
    finished_jobs_in_memory: int = Field(
        1000, ge=0, description="Finished jobs a server keeps in memory (LRU); older ones are read from the store."
    )
    max_upload_bytes: int = Field(
        32 * 1024**3, ge=1, description="Most bytes under one preprocessing source_prefix (photos and zips together)."
    )
    max_caption_chars: int = Field(
        4000, ge=1, description="Longest caption (characters) an edit, a replace or an import may store."
    )
    max_train_steps: int = Field(100_000, ge=1, description="Largest TrainSpec.max_steps a training server accepts.")
    # Fault limits of the job runtime (fluxlora.jobs.runtime).
    max_job_attempts: int = Field(
        2, ge=1, description="Starts of a job whose server or worker process died before it is failed as poison."
    )
    # Replicas of one service on one store (fluxlora.jobs.leases): each job's work is leased to one of them.
    lease_seconds: float = Field(
        30.0, ge=1.0, description="Seconds a job's lease lasts unrenewed (renewed every third); a replica takes "
        "over the jobs of one that died this long after its last renewal.",
    )
    replica_id: str = Field(
        "", description="This server's name among replicas of its service (the pod name); empty: hostname-pid. "
        "Must be unique among live replicas.",
    )
    min_free_bytes: int = Field(
        256 * 1024**2, ge=0,
        description="Free bytes a server's scratch and local store disks need before a job is accepted or started.",
    )
    preprocess_workers: int = Field(
        0, ge=0, description="Processes a preprocessing job uses; 0 means the CPUs this process may use."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    base_model: str = Field(
        "", description="Default base model: a diffusers directory or store://prefix, or a single .safetensors "
        "transformer file (local or store://key; ComfyUI's flux1-dev.safetensors) with FLUXLORA_BASE_COMPONENTS.",
    )
    base_components: str = Field(
        "", description="Diffusers directory or store://prefix with the text encoders, tokenizers, VAE, scheduler and "
        "transformer/config.json a single-file base model is completed with; empty: FLUXLORA_BASE_MODEL when that "
        "is a directory.",
    )
    caption_model: str = Field("", description="Default captioning model (directory or store://prefix).")
    device: str = Field("auto", description="Torch device for GPU services: auto, cuda, cpu.")
    # FLUX.1-dev's whole pipeline in bf16 is ~34 GB: a 24 GB card renders grids with the transformer's
    # block weights in fp8 (~12 GB) and each model on the GPU only while it runs (model CPU offload).
    inference_quantization: Literal["auto", "none", "fp8", "int8"] = Field(
        "auto", description="Evaluation: transformer block weights in 8 bits; auto: fp8 on a GPU under 40 GiB.",
    )
    inference_cpu_offload: Literal["auto", "on", "off"] = Field(
        "auto", description="Evaluation: diffusers model CPU offload; auto: on for a GPU under 40 GiB.",
    )
    gpu_memory_gib: float | None = Field(
        None, ge=0,
        description="GPU memory (GiB) training runs must fit, checked at submit by the memory planner; "
                    "unset: the server's GPU, or 24 without one; 0 turns the check off.",
    )
    # Where a server runs its jobs: in its own worker threads, each in a child process running
    # `python -m fluxlora.server.worker <service> <job_id>` (fluxlora.jobs.process: a crash fails the job, not
    # the server), or each as a Kubernetes Job running `fluxlora worker ...` (fluxlora.jobs.kubernetes; docs/deploy.md).
    runner: Literal["local", "process", "kubernetes"] = Field(
        "local", description="Job runner: local (threads), process (a child process per job) or kubernetes."
    )
    process_stop_grace_s: float = Field(
        120.0, gt=0, description="process runner: seconds a worker may take to stop after SIGTERM before SIGKILL."
    )
    k8s_namespace: str = Field("", description="Namespace for Jobs; empty: the pod's own namespace.")
    k8s_image: str = Field("", description="Image of the Job's worker; empty: the image of k8s_pod_name's container.")
    k8s_pod_name: str = Field("", description="This server's pod (downward API), whose image the worker runs.")
    k8s_service_account: str = Field("", description="ServiceAccount of the Job's pods (empty: namespace default).")
    k8s_env_from: list[str] = Field(
        default_factory=list,
        description="ConfigMaps and Secrets the worker takes its FLUXLORA_* settings from: configmap/<n>, secret/<n>.",
    )
    k8s_node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of Job pods (JSON).")
    k8s_tolerations: list[dict] = Field(default_factory=list, description="Tolerations of the Job's pods (JSON list).")
    k8s_resources: dict = Field(
        default_factory=lambda: {"limits": {"nvidia.com/gpu": "1"}},
        description="Resources of the worker container (JSON, Kubernetes ResourceRequirements).",
    )
    k8s_cache_claim: str = Field("", description="PersistentVolumeClaim for the model cache; empty: an emptyDir.")
    k8s_backoff_limit: int = Field(2, ge=0, description="Retries of a failed worker pod (spec.backoffLimit).")
    k8s_ttl_after_finished_s: int = Field(86400, ge=0, description="Seconds a finished Job is kept before deletion.")
    k8s_active_deadline_s: int = Field(
        0, ge=0, description="Seconds a Job may exist, pending included; 0: no limit (queued Jobs wait for GPUs)."
    )
    k8s_poll_s: float = Field(5.0, gt=0, description="Seconds between status polls of a running Job.")
    k8s_queue_name: str = Field(
        "", description="Kueue LocalQueue the Jobs are created suspended in (kueue.x-k8s.io/queue-name); empty: "
        "plain Jobs, not suspended, for a cluster without Kueue.",
    )
    k8s_priority_class: str = Field(
        "", description="Kueue WorkloadPriorityClass of this service's Jobs (kueue.x-k8s.io/priority-class); "
        "empty: the ClusterQueue's default. Only with k8s_queue_name.",
    )
    grid_max_cells: int = Field(
        64, ge=1, description="Most images one evaluation job renders (all grids of a grid job; a Generate job)."
    )
    grid_page_cells: int = Field(48, ge=1, description="Cells per grid image; longer grids are split into pages.")
    image_text_model: str = Field(
        "", description="CLIP-like image-text model (directory or store://prefix) for grid fidelity scores."
    )

    def port_for(self, service: str) -> int:
        return self.port or DEFAULT_PORTS[service]
