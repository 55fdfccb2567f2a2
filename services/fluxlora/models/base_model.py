"""A run's base model as the services name it: a diffusers-layout folder (local or store://<prefix>),
or a single .safetensors transformer file (local or store://<key>.safetensors, models.single_file)
plus a diffusers folder with the family's other components.

A single file's family is its header's (models.single_file), except where two families' files are
alike (FLUX.1 [dev] and Kontext): the family the run names then decides, else the components
folder's model_index. Those two families' components are the same models (FluxKontextPipeline's are
FluxPipeline's), so a ComfyUI user's flux1-kontext-dev.safetensors runs with the FLUX.1 [dev]
components folder they already have: the composed folder's model_index names the Kontext pipeline.

A single-file base resolves to a local folder of the diffusers layout whose files are links into
the components folder, with transformer/config.json fitted to the file's shapes and a marker
naming the file: everything that takes a model folder (family detection, the encoding cache's
fingerprint, the pipeline cache, models.loading) then takes a single-file base unchanged, and
only models.loading reads the marker to load the transformer from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

from fluxlora.common.models import STORE_SCHEME, cache_lock, check_model_ref, is_store_ref, resolve_model
from fluxlora.common.storage import ArtifactStore, validate_key, validate_prefix
from fluxlora.models.families import FAMILIES, detect_family
from fluxlora.models.single_file import (
    MAX_HEADER_BYTES,
    SingleFileError,
    SingleFileModel,
    default_components,
    describe,
    header_length,
    is_single_file,
    read_header,
)
from fluxlora.models.single_file_scales import check_header_scales
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, NotFound

SINGLE_FILE_MARKER = "fluxlora-single-file.json"
# The Hugging Face repository whose folder, without its transformer weights, is each family's components.
_COMPONENTS_REPO = {"flux1-dev": "black-forest-labs/FLUX.1-dev",
                    "flux1-kontext": "black-forest-labs/FLUX.1-Kontext-dev", "chroma": "lodestones/Chroma",
                    "flux2-dev": "black-forest-labs/FLUX.2-dev", "flux2-klein": "black-forest-labs/FLUX.2-klein-4B"}


def _components_fix(family: str = "") -> str:
    repo = _COMPONENTS_REPO.get(family, _COMPONENTS_REPO["flux1-dev"])
    return (f"set base_components (or the server's FLUXLORA_BASE_COMPONENTS) to a diffusers-layout folder of "
            f"{family or 'the same family'} (local or store://<prefix>) with its text encoders, tokenizers, VAE, "
            f"scheduler and transformer/config.json, e.g. {repo} downloaded without its transformer weights")

__all__ = ["SINGLE_FILE_MARKER", "check_single_file_base", "default_components", "folder_family", "is_single_file",
           "resolve_base_model", "single_file_model"]


def single_file_model(ref: str, store: ArtifactStore | None) -> SingleFileModel:
    """What the single file `ref` holds, from its header alone (a ranged read for a store object)."""
    if is_store_ref(ref):
        if store is None:
            raise ValueError(f"{ref!r} is a store reference but no store was given")
        key = validate_key(ref[len(STORE_SCHEME):])
        if not store.exists(key):
            raise NotFound(f"base model {ref!r}: the store has no object {key!r}; upload the .safetensors file "
                           f"there first")
        prefix = store.get_range(key, 0, 8)
        length = header_length(prefix) - 8  # never more than a header can be: a junk file's "length" is anything
        source = _Bytes(prefix + (store.get_range(key, 8, length) if length <= MAX_HEADER_BYTES else b""))
        header = read_header(source, ref)  # type: ignore[arg-type]
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise NotFound(f"base model file {ref!r} not found: pass a local .safetensors file, store://<key>, "
                           f"or a diffusers-layout directory")
        if path.suffix.lower() != ".safetensors":
            raise InvalidArgument(f"base model {ref!r} is a file but not a .safetensors file: pass a FLUX "
                                  f"transformer .safetensors (such as ComfyUI's flux1-dev.safetensors or BFL's "
                                  f"flux2-dev.safetensors) or a diffusers-layout directory")
        header = read_header(path, ref)
    check_header_scales(header, ref)
    return describe(header, ref)


class _Bytes:
    def __init__(self, data: bytes):
        self._data, self._at = data, 0

    def read(self, n: int) -> bytes:
        chunk = self._data[self._at:self._at + n]
        self._at += len(chunk)
        return chunk


def check_single_file_base(ref: str, components: str, store: ArtifactStore, named: str = "") -> SingleFileModel:
    """Submit-time check of a single-file base and its components folder, without loading weights;
    the file as the family it is to run as (the components folder decides between families whose
    files are alike). INVALID_ARGUMENT for a file that is not a FLUX safetensors transformer, whose
    family differs from the components'; FAILED_PRECONDITION for a missing components folder; all name the file and
    the fix. A `named` family the file may be wins over the components folder's (alike files have the
    same components); one it cannot be is left to models.families.agreed_family."""
    try:
        model = single_file_model(ref, store)
    except SingleFileError as exc:
        raise InvalidArgument(str(exc)) from exc
    found = _components_family(ref, components, store)
    if found is not None and found not in model.families:
        fix = _components_fix(model.family)
        raise InvalidArgument(f"the base model file {ref} is a {model.family} transformer but its components folder "
                              f"{components} is a {found} model: {fix}")
    return model.as_family(named if named in model.families else found)


def _components_family(ref: str, components: str, store: ArtifactStore) -> str | None:
    if not components:
        raise FailedPrecondition(f"base model {ref} is a single .safetensors file and no components folder is "
                                 f"named: {_components_fix()}")
    if is_single_file(components):
        raise FailedPrecondition(f"base_components {components!r} for the base model file {ref} is a file, not a "
                                 f"folder: {_components_fix()}")
    try:
        check_model_ref(components, store, "components folder")
    except NotFound as exc:
        raise FailedPrecondition(f"the components folder {components!r} of the base model file {ref} is missing: "
                                 f"{_components_fix()}") from exc
    configs = [_json(components, name, store) for name in ("model_index.json", "transformer/config.json")]
    if configs[1] is None:
        raise FailedPrecondition(f"the components folder {components!r} of the base model file {ref} has no "
                                 f"transformer/config.json: {_components_fix()}")
    return detect_family(*configs)


def folder_family(folder: str, store: ArtifactStore) -> str | None:
    """The family a diffusers-layout folder's configs name; None when they cannot be read or say none."""
    return detect_family(*[_json(folder, name, store) for name in ("model_index.json", "transformer/config.json")])


def _json(folder: str, name: str, store: ArtifactStore) -> dict | None:
    try:
        if is_store_ref(folder):
            key = validate_prefix(folder[len(STORE_SCHEME):]).rstrip("/") + "/" + name
            return store.get_json(key) if store.exists(key) else None
        return json.loads((Path(folder).expanduser() / name).read_text())
    except (OSError, ValueError):
        return None


def resolve_base_model(ref: str, components: str, store: ArtifactStore, cache_dir: Path, family: str = "") -> Path:
    """A local diffusers-layout folder for the base model `ref` (models.families and models.loading
    take it): the folder itself, its mirror for a store prefix, or for a single file a folder of
    links into `components` with a transformer that loads from the file, as the run's `family`
    where the file may be more than one."""
    if not is_single_file(ref):
        return resolve_model(ref, store, cache_dir, "base model")
    model = check_single_file_base(ref, components, store, family)
    file = _local_file(ref, store, Path(cache_dir))
    folder = resolve_model(components, store, cache_dir, "components folder")
    stat = file.stat()
    digest = hashlib.sha256(json.dumps([str(file.resolve()), stat.st_size, stat.st_mtime_ns,
                                        str(folder.resolve()), model.family]).encode()).hexdigest()[:16]
    target = Path(cache_dir) / "models" / "single-file" / f"{file.stem}-{digest}"
    marker = target / "transformer" / SINGLE_FILE_MARKER
    if not marker.is_file():
        # The ranks of a data-parallel run start together: one composes, the others wait for it.
        with cache_lock(Path(cache_dir) / "locks" / f"single-file_{target.name}.lock"):
            if not marker.is_file():
                _compose(target, file, folder, model)
    return target


def _local_file(ref: str, store: ArtifactStore, cache_dir: Path) -> Path:
    if not is_store_ref(ref):
        return Path(ref).expanduser()
    key = validate_key(ref[len(STORE_SCHEME):])
    info = store.stat(key)
    target = cache_dir / "models" / "files" / re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    stamp = target.with_name(target.name + ".source.json")
    wanted = json.dumps([info.size, info.version])
    if target.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return target
    with cache_lock(cache_dir / "locks" / f"files_{target.name}.lock"):
        if target.is_file() and stamp.is_file() and stamp.read_text() == wanted:
            return target  # fetched by the process that held the lock before us
        stamp.unlink(missing_ok=True)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}-{threading.get_ident()}")
        store.get_file(key, partial)
        partial.replace(target)
        stamp.write_text(wanted)
    return target


def _compose(target: Path, file: Path, folder: Path, model: SingleFileModel) -> None:
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = source.relative_to(folder)
        if relative.parts[0] == "transformer" or relative.name.startswith(".fluxlora"):
            continue  # the transformer comes from the file; cache markers are the mirror's own
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        (staging / relative).symlink_to(source.resolve())
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    pipeline = FAMILIES[model.family].pipeline_class.__name__
    if index is not None and index.get("_class_name") != pipeline:
        # An alike family's components folder (FLUX.1 [dev]'s for a Kontext file): same components.
        (staging / "model_index.json").unlink()
        (staging / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}, indent=2))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config.update(model.config)
    (staging / "transformer").mkdir(parents=True, exist_ok=True)
    (staging / "transformer" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    marker = {"file": str(file.resolve()), "family": model.family, "layout": model.layout, "dtype": model.dtype}
    (staging / "transformer" / SINGLE_FILE_MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another process composed the same folder first
        shutil.rmtree(staging, ignore_errors=True)
