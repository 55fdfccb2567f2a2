"""The base model's tokenizers for caption checks, from a local FLUX directory or store://prefix.

Only the tokenizer/ and tokenizer_2/ folders are fetched from the store (a few MB), never the
model's weights. Loaded counters are kept per process, like the captioner.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fluxlora.captioning.text_encoders import (
    TOKENIZER_FOLDERS,
    TokenCounter,
    approximate_counters,
    flux_tokenizer_dirs,
    load_counters,
)
from fluxlora.common.models import STORE_SCHEME, is_store_ref, resolve_model
from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import NotFound

_cache: dict[tuple[str, str], tuple[list[TokenCounter], list[str]]] = {}
_cache_lock = threading.Lock()


def counters_for(ref: str, store: ArtifactStore, cache_dir: Path) -> tuple[list[TokenCounter], list[str]]:
    """(counters, notes): exact when `ref` names a FLUX model with tokenizers, approximate otherwise."""
    if not ref:
        return approximate_counters(), []
    key = (store.uri, ref)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(ref, store, cache_dir)
        return _cache[key]


def _load(ref: str, store: ArtifactStore, cache_dir: Path) -> tuple[list[TokenCounter], list[str]]:
    if not is_store_ref(ref):
        return load_counters(flux_tokenizer_dirs(Path(ref).expanduser()))
    prefix = ref[len(STORE_SCHEME):].rstrip("/") + "/"
    dirs = {}
    for encoder, (folder, _) in TOKENIZER_FOLDERS.items():
        try:
            dirs[encoder] = resolve_model(f"{STORE_SCHEME}{prefix}{folder}/", store, cache_dir, f"{encoder} tokenizer")
        except NotFound:
            pass  # load_counters estimates that encoder's tokens and says so
    return load_counters(dirs)
