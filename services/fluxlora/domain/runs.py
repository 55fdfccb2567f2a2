"""Reading a training run's stored state: its info and which checkpoints exist."""

from __future__ import annotations

import re

from fluxlora.common import keys
from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, NotFound

LORA_FILE = "pytorch_lora_weights.safetensors"
_STEP = re.compile(r"checkpoints/step-(\d+)/" + re.escape(LORA_FILE) + "$")


def require_run(store: ArtifactStore, run_id: str) -> dict:
    if not run_id.strip():
        raise InvalidArgument("spec.run_id is empty: pass the id of a training run")
    if not store.exists(keys.run_info(run_id)):
        raise NotFound(f"training run {run_id!r} not found (no {keys.run_info(run_id)})")
    return store.get_json(keys.run_info(run_id))


def list_checkpoints(store: ArtifactStore, run_id: str) -> dict[int, str]:
    """step -> key of the LoRA weights, for every complete checkpoint of a run."""
    found = {}
    for obj in store.list(keys.run_prefix(run_id) + "checkpoints/"):
        match = _STEP.search(obj.key)
        if match:
            found[int(match.group(1))] = obj.key
    return dict(sorted(found.items()))


def select_checkpoints(store: ArtifactStore, run_id: str, steps: list[int]) -> dict[int, str]:
    available = list_checkpoints(store, run_id)
    if not available:
        raise FailedPrecondition(f"training run {run_id!r} has no checkpoints yet; wait for its first checkpoint")
    missing = [s for s in steps if s not in available]
    if missing:
        raise NotFound(
            f"run {run_id!r} has no checkpoint at step(s) {missing}; available: {sorted(available)}"
        )
    return {s: available[s] for s in steps} if steps else available
