"""Where a model comes from: a local directory, or an object-store prefix ("store://<prefix>")
mirrored once into the local cache. Loaders then call from_pretrained on a local directory, so the
same code loads the tiny demo models and the real FLUX.1 / Florence-2 weights."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import threading
from pathlib import Path

from fluxlora.common.storage import ArtifactStore, validate_prefix
from fluxlora_api.shared.errors import NotFound

STORE_SCHEME = "store://"
_COMPLETE = ".fluxlora-complete.json"


def is_store_ref(ref: str) -> bool:
    return ref.startswith(STORE_SCHEME)


def check_model_ref(ref: str, store: ArtifactStore, what: str) -> None:
    """Cheap existence check for submit-time validation (no download)."""
    if not ref:
        raise NotFound(f"no {what} given and the server has no default: pass a directory or store://<prefix>")
    if is_store_ref(ref):
        prefix = validate_prefix(ref[len(STORE_SCHEME):])
        if next(iter(store.list(prefix)), None) is None:
            raise NotFound(f"{what} {ref!r}: the store has no objects under {prefix!r}; upload the model there first")
    elif not Path(ref).expanduser().is_dir():
        raise NotFound(
            f"{what} {ref!r} not found: pass a local directory in diffusers/transformers layout or store://<prefix>"
        )


def resolve_model(ref: str, store: ArtifactStore, cache_dir: Path, what: str = "model") -> Path:
    """A local directory holding the model, downloading a store prefix into the cache when needed."""
    check_model_ref(ref, store, what)
    if not is_store_ref(ref):
        return Path(ref).expanduser()
    prefix = validate_prefix(ref[len(STORE_SCHEME):])
    listing = [(o.key, o.size, o.version) for o in store.list(prefix)]
    target = Path(cache_dir) / "models" / re.sub(r"[^A-Za-z0-9._-]+", "_", prefix.strip("/"))
    marker = target / _COMPLETE
    if marker.exists() and json.loads(marker.read_text()) == [list(x) for x in listing]:
        return target
    # One download per model at a time: the ranks of a data-parallel run start together, and a second
    # process swapping in its copy would delete the one the first is already loading from.
    with cache_lock(Path(cache_dir) / "locks" / f"models_{target.name}.lock"):  # (beside models/, not in it)
        if marker.exists() and json.loads(marker.read_text()) == [list(x) for x in listing]:
            return target  # fetched by the process that held the lock before us
        return _mirror(store, prefix, listing, target)


def _mirror(store: ArtifactStore, prefix: str, listing: list, target: Path) -> Path:
    # Mirror into a private directory and swap it in: files deleted from the store disappear from
    # the cache too, and two processes fetching at once never read a half-written model.
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    store.download_prefix(prefix, staging)
    # Written last: a cache directory without it is an interrupted download and is fetched again.
    (staging / _COMPLETE).write_text(json.dumps(listing))
    shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another process swapped in its copy first; it holds the same listing
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def cache_lock(path: Path):
    """An exclusive lock on `path` between processes (flock; released when the process dies, too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
