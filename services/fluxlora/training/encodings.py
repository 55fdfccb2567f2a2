"""The training job's side of the encoding cache: which cached encodings a run can use, fetched
from the object store before training, and a new one stored as soon as the trainer writes it."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from fluxlora.common import keys
from fluxlora.common.storage import ArtifactStore
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.data import find_pairs
from fluxlora.training.trainer.encoding_cache import encoding_key
from fluxlora_api.shared.files import sha256_file

log = logging.getLogger(__name__)

_HASHED_BYTES = 1 << 20  # configs and tokenizer files are hashed whole; weight files by name and size


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a diffusers model directory that changes when any of its files does, without
    reading gigabytes of weights: small files by content, large ones by path and size."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{size}\0".encode())
        if size <= _HASHED_BYTES:
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def fetch_encodings(store: ArtifactStore, dataset_dir: Path, model_dir: Path, cfg: TrainConfig,
                    scratch: Path) -> tuple[Path, str, bool]:
    """(local path for the run's encodings, its store key, whether it was fetched). It is fetched
    when an earlier run with the same images, captions, model and resolution stored it; otherwise
    the trainer encodes and writes it there."""
    key = keys.encoding_cache(encoding_key(find_pairs(dataset_dir), model_fingerprint(model_dir), cfg.resolution,
                                           cfg.max_sequence_length, cfg.sample_prompts))
    local = Path(scratch) / "encodings.safetensors"
    if not store.exists(key):
        return local, key, False
    store.get_file(key, local)
    return local, key, True


def store_encodings(store: ArtifactStore, path: Path, key: str) -> None:
    """Keep a newly written encoding cache for later runs; failing to is not the run's failure."""
    try:
        store.put_file(key, path)
    except Exception as exc:  # noqa: BLE001 - the cache only saves time
        log.warning("could not store the encoded dataset as %s: %s", key, exc)
