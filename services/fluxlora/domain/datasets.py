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
