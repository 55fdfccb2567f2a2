"""Submit-time check that a run's named family (TrainSpec.family) agrees with its base model, read
from the model's model_index.json alone (a local directory or store://<prefix>), so a mismatch is
refused in milliseconds instead of failing the job after the model is fetched."""

from __future__ import annotations

import json
from pathlib import Path

from fluxlora.common.models import STORE_SCHEME, is_store_ref
from fluxlora.common.storage import ArtifactStore, validate_prefix
from fluxlora.models.base_model import check_single_file_base, is_single_file
from fluxlora.models.families import FAMILIES, agreed_family, detect_family
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument


def check_family(base_model: str, named: str, store: ArtifactStore, *, to_train: bool = True,
                 components: str = "") -> None:
    """INVALID_ARGUMENT naming the model and the fix when `named` disagrees with the model, or when
    no family is named and the model's is unknown; FAILED_PRECONDITION, when the run is `to_train`
    (not only planned), for a family this trainer recognises but cannot train yet. A model without
    a readable model_index.json is left to the job. A single-file base is checked with its
    `components` folder (models.base_model.check_single_file_base), and its family is its header's,
    or its components folder's where the header allows both (FLUX.1 [dev] and Kontext)."""
    if is_single_file(base_model):
        found: str | None = check_single_file_base(base_model, components, store, named).family
    else:
        index = _model_index(base_model, store)
        if index is None:
            return
        found = detect_family(index, None)
    try:
        family = agreed_family(found, named, base_model)
    except ValueError as exc:
        raise InvalidArgument(f"spec.family: {exc}") from exc
    if to_train and family not in FAMILIES:
        raise FailedPrecondition(f"base model {base_model} is a {family} model, which this trainer cannot train yet "
                                 f"(trainable: {', '.join(FAMILIES)}); PlanTraining estimates it")


def _model_index(base_model: str, store: ArtifactStore) -> dict | None:
    try:
        if is_store_ref(base_model):
            key = validate_prefix(base_model[len(STORE_SCHEME):]).rstrip("/") + "/model_index.json"
            return store.get_json(key) if store.exists(key) else None
        return json.loads((Path(base_model) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
