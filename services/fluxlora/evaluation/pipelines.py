"""Models kept loaded between jobs of one server process.

Loading FLUX.1-dev takes tens of seconds and ~33 GB, so the evaluation service loads a base model
once per process and lends it to every grid and generate job on that base. Jobs switch LoRAs by
loading and unloading adapters; on return the cache unloads whatever adapters are left, so no job
sees another's LoRA. One model is kept at a time (a second base replaces the first): two FLUX
pipelines would not fit one GPU. A job holds the model for its whole duration, so jobs on the
same server take turns (GPU services run one worker anyway).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import torch

from fluxlora.models.families import family_for_model
from fluxlora.models.loading import load_flux_pipeline

log = logging.getLogger(__name__)


class ModelCache:
    """One loaded model, keyed by what it was loaded from; `loads` counts real loads."""

    def __init__(self, loader: Callable[..., Any], release: Callable[[Any], None] | None = None):
        self._loader = loader
        self._release = release
        self._lock = threading.Lock()
        self._key: Hashable | None = None
        self._model: Any = None
        self.loads = 0

    @contextlib.contextmanager
    def borrow(self, key: Hashable, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """The model for `key` (loaded with loader(*args, **kwargs) when not cached), held by this
        caller until the block ends; `release` then cleans it for the next borrower."""
        with self._lock:
            if self._key != key or self._model is None:
                self._drop()
                self._model = self._loader(*args, **kwargs)
                self._key = key
                self.loads += 1
            try:
                yield self._model
            finally:
                if self._release is not None:
                    try:
                        self._release(self._model)
                    except Exception:
                        # A model that cannot be cleaned is not lent again.
                        log.exception("could not clean the cached model; dropping it")
                        self._drop()

    def clear(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._model is None:
            return
        self._model, self._key = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def unload_adapters(pipe: Any) -> None:
    """Back to the plain base model: no adapters and no empty LoRA wrappers in the modules."""
    if pipe.get_list_adapters():
        pipe.delete_adapters([n for names in pipe.get_list_adapters().values() for n in names])
    pipe.unload_lora_weights()
    if any("lora_" in name for name, _ in pipe.transformer.named_modules()):
        raise RuntimeError("LoRA layers left in the transformer after unloading")


def pipeline_key(model_dir: Path, device: torch.device, dtype: torch.dtype, *options: Hashable) -> tuple:
    """What identifies a loaded base: its directory (and when that was last written), device, dtype
    and how it was loaded."""
    index = Path(model_dir) / "model_index.json"
    written = index.stat().st_mtime_ns if index.exists() else 0
    return str(Path(model_dir).resolve()), written, str(device), str(dtype), *options


PIPELINES = ModelCache(load_flux_pipeline, release=unload_adapters)


@contextlib.contextmanager
def base_pipeline(model_dir: Path, device: torch.device, dtype: torch.dtype, quantization: str = "none",
                  cpu_offload: bool = False, family: str = "") -> Iterator[Any]:
    """The process's FLUX pipeline for model_dir, loaded at most once while it stays in use;
    quantization and cpu_offload as for load_flux_pipeline (job_support.inference_loading picks them);
    `family` as the spec names it ("": detected from the model)."""
    key = pipeline_key(model_dir, device, dtype, quantization, cpu_offload, family)
    with PIPELINES.borrow(key, model_dir, device, dtype, cpu_offload=cpu_offload, base_quantization=quantization,
                          family=family_for_model(model_dir, family)) as pipe:
        yield pipe
