"""Configuration shared by every server and the SDK: environment variables (FLUXLORA_*) and flags.

Secrets (S3 keys) come only from the environment or files, never from flags, so they stay out of
process listings and shell history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("preprocessing", "captioning", "training", "evaluation")
DEFAULT_PORTS = {"preprocessing": 50051, "captioning": 50052, "training": 50053, "evaluation": 50054}


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
    cache_dir: Path = Field(
        Path.home() / ".cache" / "fluxlora",
        description="Local mirror of models fetched from the store (store://<prefix>).",
    )
    host: str = Field("127.0.0.1", description="Address the server binds to.")
    port: int = Field(0, description="Port; 0 means the service's default port.")
    workers: int = Field(1, ge=1, description="Jobs a server runs at once (GPU services: 1).")
    max_queued_jobs: int = Field(64, ge=1, description="Queued jobs beyond which submits get RESOURCE_EXHAUSTED.")
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    base_model: str = Field("", description="Default base model (directory or store://prefix).")
    caption_model: str = Field("", description="Default captioning model (directory or store://prefix).")
    device: str = Field("auto", description="Torch device for GPU services: auto, cuda, cpu.")

    def port_for(self, service: str) -> int:
        return self.port or DEFAULT_PORTS[service]
