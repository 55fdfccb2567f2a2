"""Submit-time checks and defaults for grid and generate requests.

Everything a job would fail on later is checked here, against the store, so a bad request gets
a status at once (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION) and the stored spec is complete:
a job never has to guess a default again.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from fluxlora.common import keys
from fluxlora.common.config import Settings
from fluxlora.common.limits import INT64_MAX, Bound, check_numbers
from fluxlora.common.models import check_model_ref
from fluxlora.common.storage import ArtifactStore
from fluxlora.domain.runs import list_checkpoints, require_run, select_checkpoints
from fluxlora.evaluation.job_support import IMAGE_SUFFIXES
from fluxlora.models.base_model import check_single_file_base, default_components, folder_family, is_single_file
from fluxlora.models.families import agreed_family
from fluxlora_api.shared.errors import InvalidArgument, NotFound
from fluxlora_api.v1 import evaluation_pb2 as pb

DEFAULT_STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_STRENGTH = 2.0
DEFAULT_SEED = 42
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.5
DEFAULT_SIZE = 1024
MAX_SIDE = 4096
MAX_STEPS = 500
NO_MODEL = "none"
MAX_GUIDANCE = 100
MAX_STEP = 10**9  # a checkpoint step: far beyond FLUXLORA_MAX_TRAIN_STEPS, below any overflow


def bounds(settings: Settings) -> dict[str, Bound]:
    """Every numeric GridSpec and GenerateSpec field (fluxlora.common.limits.check_numbers)."""
    side = Bound(0, MAX_SIDE, f"0 means the run's resolution, else {DEFAULT_SIZE}; a multiple of 16")
    strength = Bound(-MAX_STRENGTH, MAX_STRENGTH)
    seed = Bound(0, INT64_MAX)
    step = Bound(0, MAX_STEP, "0 means the run's latest checkpoint")
    cells = f"FLUXLORA_GRID_MAX_CELLS={settings.grid_max_cells}"
    return {
        "checkpoint_steps": Bound(1, MAX_STEP), "strengths": strength, "seed": seed, "seeds": seed,
        "width": side, "height": side, "steps": Bound(0, MAX_STEPS, f"0 means {DEFAULT_STEPS}"),
        "guidance": Bound(0, MAX_GUIDANCE, "FLUX.1-dev is distilled around 3.5"),
        "rows_per_page": Bound(0, settings.grid_max_cells, f"0 means the server's page size; {cells}"),
        "images_per_prompt": Bound(0, settings.grid_max_cells, f"0 means 1; {cells}"),
        "loras.step": step, "loras.strength": strength,
    }


def grid_spec(request: pb.GridSpec, store: ArtifactStore, settings: Settings) -> pb.GridSpec:
    """The request with every default filled in, or an error naming the field and the fix."""
    spec = pb.GridSpec()
    spec.CopyFrom(request)
    check_numbers(spec, bounds(settings))
    if spec.loras:
        run = _grid_loras(spec, store)
    else:
        run = require_run(store, spec.run_id)
        checkpoints = select_checkpoints(store, spec.run_id, list(spec.checkpoint_steps))
        if not spec.checkpoint_steps:
            spec.checkpoint_steps.extend(checkpoints)
    rows = len(spec.loras) or len(spec.checkpoint_steps)
    if not spec.strengths:
        spec.strengths.extend(DEFAULT_STRENGTHS)
    _check_strengths("spec.strengths", list(spec.strengths))
    config = run.get("config", {})

    if spec.prompt and spec.prompts:
        raise InvalidArgument("set spec.prompt or spec.prompts (one grid per prompt), not both")
    if spec.prompt and not spec.prompt.strip():
        raise InvalidArgument("spec.prompt is blank; leave it empty to use the run's sample prompt")
    _check_prompts("spec.prompts", list(spec.prompts))
    if not spec.prompts and not spec.prompt and not run:
        raise InvalidArgument("spec.prompt is empty and no LoRA in spec.loras names a training run to take its "
                              "sample prompt from: pass spec.prompt (or spec.prompts)")
    if not spec.prompts:
        spec.prompts.append(spec.prompt or (config.get("sample_prompts") or [run["trigger_word"]])[0])
    spec.prompt = spec.prompts[0]
    if spec.HasField("seed") and spec.seeds:
        raise InvalidArgument("set spec.seed or spec.seeds (one grid per seed), not both")
    if not spec.seeds:
        spec.seeds.append(spec.seed if spec.HasField("seed") else DEFAULT_SEED)
    spec.seed = spec.seeds[0]

    _size_and_steps(spec, config.get("resolution", DEFAULT_SIZE))
    if not spec.HasField("guidance"):
        spec.guidance = config.get("guidance", DEFAULT_GUIDANCE)
    if spec.rows_per_page < 0:
        raise InvalidArgument("spec.rows_per_page must be >= 0 (0 means the server's page size)")

    panels = len(spec.prompts) * len(spec.seeds)
    cells = panels * rows * len(spec.strengths)
    if cells > settings.grid_max_cells:
        raise InvalidArgument(
            f"the grid has {rows} checkpoints x {len(spec.strengths)} strengths"
            + (f" x {panels} grids (prompts x seeds)" if panels > 1 else "")
            + f" = {cells} cells, over this server's limit of {settings.grid_max_cells}: pick fewer "
            "checkpoint_steps (or loras), strengths, prompts or seeds (or raise FLUXLORA_GRID_MAX_CELLS)"
        )

    if spec.loras and not spec.base_model and not run:
        raise InvalidArgument("spec.base_model is empty and no LoRA in spec.loras names a training run to take it "
                              "from: pass the base model the LoRA files were trained on")
    if spec.loras and not run:
        spec.skip_convergence = True  # no run, so no dataset to measure the held-out loss on
    check_base_model(spec, run or {}, store, settings)
    if spec.image_text_model != NO_MODEL:
        spec.image_text_model = spec.image_text_model or settings.image_text_model
        if spec.image_text_model:
            check_model_ref(spec.image_text_model, store, "image-text model")
    spec.control_image = spec.control_image or _first_control_image(store, run)
    _check_control_image(spec.control_image, store)
    return spec


def _first_control_image(store: ArtifactStore, run: dict) -> str:
    """The control image of the first pair of the run's dataset when it is an editing (pair)
    dataset; "" otherwise."""
    dataset_id = run.get("dataset_id", "")
    if not dataset_id or not store.exists(keys.dataset_manifest(dataset_id)):
        return ""
    manifest = store.get_json(keys.dataset_manifest(dataset_id))
    images = manifest.get("images") or []
    if not manifest.get("paired") or not images:
        return ""
    return keys.dataset_controls(dataset_id) + images[0]["file_name"]


def _check_control_image(key: str, store: ArtifactStore) -> None:
    if not key:
        return
    if not key.lower().endswith(IMAGE_SUFFIXES):
        raise InvalidArgument(f"spec.control_image {key!r} is not an image key: name a stored .png, .jpg or .webp")
    if not store.exists(key):
        raise NotFound(f"spec.control_image {key!r} is not in the store: upload the image to edit first "
                              "(e.g. a dataset's datasets/<id>/control/<stem>.png)")


def _grid_loras(spec: pb.GridSpec, store: ArtifactStore) -> dict:
    """Resolves each row LoRA to a key, step and label in place; returns the first named run ({} if none)."""
    if spec.run_id:
        raise InvalidArgument("set spec.run_id (a run's checkpoints as rows) or spec.loras (LoRA files as rows), "
                              "not both")
    if spec.checkpoint_steps:
        raise InvalidArgument("spec.checkpoint_steps picks checkpoints of spec.run_id; with spec.loras give each "
                              "row's run_id and step instead")
    first_run: dict = {}
    for i, lora in enumerate(spec.loras):
        field = f"spec.loras[{i}]"
        if bool(lora.key) == bool(lora.run_id):
            raise InvalidArgument(f"{field}: set key (a LoRA file in the store) or run_id (+ step), exactly one")
        if lora.key:
            if not lora.key.endswith(".safetensors"):
                raise InvalidArgument(f"{field}.key {lora.key!r} is not a .safetensors file: pass the key of a "
                                      "LoRA weights file")
            if not store.exists(lora.key):
                raise NotFound(f"{field}.key {lora.key!r}: no such object in the store; upload the LoRA file first")
            lora.label = lora.label.strip() or PurePosixPath(lora.key).name
            continue
        run = require_run(store, lora.run_id)
        first_run = first_run or run
        available = list_checkpoints(store, lora.run_id)
        step = lora.step or (max(available) if available else 0)
        lora.key = select_checkpoints(store, lora.run_id, [step])[step]
        lora.step = step
        lora.label = lora.label.strip() or f"{lora.run_id} step {step}"
    labels = [lora.label for lora in spec.loras]
    for lora in spec.loras:
        if labels.count(lora.label) > 1:
            lora.label = lora.key  # two files of the same name: the key tells them apart
    return first_run


def generate_spec(request: pb.GenerateSpec, store: ArtifactStore, settings: Settings) -> pb.GenerateSpec:
    """The request with every default filled in and each LoRA resolved to a key in the store."""
    spec = pb.GenerateSpec()
    spec.CopyFrom(request)
    check_numbers(spec, bounds(settings))
    if not spec.prompts:
        raise InvalidArgument("spec.prompts is empty: pass at least one prompt")
    _check_prompts("spec.prompts", list(spec.prompts))
    if spec.images_per_prompt < 0:
        raise InvalidArgument("spec.images_per_prompt must be >= 1 (0 means 1)")
    spec.images_per_prompt = spec.images_per_prompt or 1
    images = len(spec.prompts) * spec.images_per_prompt
    if images > settings.grid_max_cells:
        raise InvalidArgument(
            f"{len(spec.prompts)} prompts x {spec.images_per_prompt} images = {images} images, over this "
            f"server's limit of {settings.grid_max_cells}: split the request (or raise FLUXLORA_GRID_MAX_CELLS)"
        )
    if not spec.HasField("seed"):
        spec.seed = DEFAULT_SEED

    first_run = None
    for i, lora in enumerate(spec.loras):
        run = _resolve_lora(f"spec.loras[{i}]", lora, store)
        first_run = first_run or run
    config = (first_run or {}).get("config", {})
    _size_and_steps(spec, config.get("resolution", DEFAULT_SIZE))
    if not spec.HasField("guidance"):
        spec.guidance = config.get("guidance", DEFAULT_GUIDANCE)
    check_base_model(spec, first_run or {}, store, settings)
    _check_control_image(spec.control_image, store)
    return spec


def check_base_model(spec: pb.GridSpec | pb.GenerateSpec, run: dict, store: ArtifactStore,
                     settings: Settings) -> None:
    """Fill in base_model (and a single file's base_components) from the run, else the server, and
    check that they exist and agree with spec.family (INVALID_ARGUMENT naming the model and the fix)."""
    from_run = not spec.base_model and bool(run.get("base_model"))
    spec.base_model = spec.base_model or run.get("base_model", "") or settings.base_model
    if from_run and not spec.family:
        # The run's named family: a Kontext file trained with FLUX.1 [dev]'s components renders as Kontext.
        spec.family = run.get("config", {}).get("family", "")
    if is_single_file(spec.base_model):
        spec.base_components = (spec.base_components or (run.get("base_components", "") if from_run else "")
                                or default_components(settings))
        found: str | None = check_single_file_base(spec.base_model, spec.base_components, store,
                                                         spec.family).family
    else:
        if spec.base_components:
            raise InvalidArgument(f"spec.base_components is only for a single .safetensors base model; base model "
                                  f"{spec.base_model!r} is a folder with its own components: leave it unset")
        check_model_ref(spec.base_model, store, "base model")
        found = folder_family(spec.base_model, store)
    if found is None and not spec.family:
        return  # a folder this server cannot read (a path in the job's pod): the job detects it
    try:
        agreed_family(found, spec.family, spec.base_model)
    except ValueError as exc:
        raise InvalidArgument(f"spec.family: {exc}") from exc


def _resolve_lora(field: str, lora: pb.LoraWeight, store: ArtifactStore) -> dict | None:
    """Fills lora.key (and the step of a run's latest checkpoint) and its strength; returns the run."""
    if not lora.HasField("strength"):
        lora.strength = 1.0
    _check_strengths(f"{field}.strength", [lora.strength])
    if bool(lora.key) == bool(lora.run_id):
        raise InvalidArgument(f"{field}: set key (a LoRA file in the store) or run_id (+ step), exactly one")
    if lora.key:
        if not store.exists(lora.key):
            raise NotFound(f"{field}.key {lora.key!r}: no such object in the store; upload the LoRA file first")
        return None
    run = require_run(store, lora.run_id)
    available = list_checkpoints(store, lora.run_id)
    step = lora.step or (max(available) if available else 0)
    lora.key = select_checkpoints(store, lora.run_id, [step])[step]
    lora.step = step
    return run


def _check_strengths(field: str, values: list[float]) -> None:
    bad = [s for s in values if not -MAX_STRENGTH <= s <= MAX_STRENGTH]
    if bad:
        raise InvalidArgument(f"{field} must lie in [-{MAX_STRENGTH}, {MAX_STRENGTH}]; got {bad}")


def _check_prompts(field: str, prompts: list[str]) -> None:
    blank = [i for i, p in enumerate(prompts) if not p.strip()]
    if blank:
        raise InvalidArgument(f"{field}[{blank[0]}] is empty or blank: every prompt needs some text")


def _size_and_steps(spec: pb.GridSpec | pb.GenerateSpec, default_size: int) -> None:
    if spec.width < 0 or spec.height < 0 or spec.steps < 0:
        raise InvalidArgument("spec.width, spec.height and spec.steps must be >= 0 (0 means the default)")
    spec.width = spec.width or default_size
    spec.height = spec.height or default_size
    if spec.width % 16 or spec.height % 16:
        raise InvalidArgument(f"spec.width and spec.height must be multiples of 16, got {spec.width}x{spec.height}")
    if max(spec.width, spec.height) > MAX_SIDE:
        raise InvalidArgument(f"spec.width and spec.height must be at most {MAX_SIDE}, got {spec.width}x{spec.height}")
    spec.steps = spec.steps or DEFAULT_STEPS
    if spec.steps > MAX_STEPS:
        raise InvalidArgument(f"spec.steps must be at most {MAX_STEPS}, got {spec.steps}")
