"""Submit-time checks that a dataset exists and has reached a stage, shared by the services."""

from __future__ import annotations

from fluxlora.common import keys
from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, NotFound


def require_dataset(store: ArtifactStore, dataset_id: str) -> None:
    if not dataset_id.strip():
        raise InvalidArgument("spec.dataset_id is empty: preprocess photos first and pass the dataset id")
    if not store.exists(keys.dataset_manifest(dataset_id)):
        raise NotFound(
            f"dataset {dataset_id!r} not found (no {keys.dataset_manifest(dataset_id)}): run preprocess first"
        )


def require_captions(store: ArtifactStore, dataset_id: str) -> dict:
    require_dataset(store, dataset_id)
    if not store.exists(keys.dataset_captions(dataset_id)):
        raise FailedPrecondition(
            f"dataset {dataset_id!r} has no captions ({keys.dataset_captions(dataset_id)} is missing): "
            "run caption first"
        )
    return store.get_json(keys.dataset_captions(dataset_id))


def dataset_base_size(store: ArtifactStore, dataset_id: str) -> int | None:
    """The base size a dataset was preprocessed at (its manifest's options), None when unknown."""
    try:
        manifest = store.get_json(keys.dataset_manifest(dataset_id))
    except Exception:  # noqa: BLE001 - no manifest or an unreadable one: the caller keeps its default
        return None
    size = (manifest.get("options") or {}).get("base_size") if isinstance(manifest, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def is_pair_dataset(store: ArtifactStore, dataset_id: str) -> bool:
    """Whether the dataset is an editing dataset of before/after pairs (its manifest says "paired")."""
    key = keys.dataset_manifest(dataset_id)
    return store.exists(key) and bool(store.get_json(key).get("paired"))


def stored_controls(store: ArtifactStore, dataset_id: str) -> dict[str, str]:
    """An editing dataset's control (before) images by the file name of the training image each
    belongs to (the same name under keys.dataset_controls): their store keys; {} for other datasets."""
    prefix = keys.dataset_controls(dataset_id)
    return {info.key[len(prefix):]: info.key for info in store.list(prefix)}
