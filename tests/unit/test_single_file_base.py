"""A base model held as ONE .safetensors file, as ComfyUI users hold FLUX.1 [dev] and Chroma and BFL
ships FLUX.2 [dev] and [klein] (BFL key layout, or ComfyUI's model.diffusion_model. prefix;
bf16/fp32 or fp8), plus a diffusers folder with the other components: its header alone tells the
family and shape, it loads through diffusers' from_single_file into the same transformer as the
folder, renders the same latents, trains the same losses, plans the same memory, and a file that
is not one is refused naming the file and the fix. A FLUX.1 Kontext file, whose header is FLUX.1
[dev]'s, is the family the run names (Kontext with FLUX.1 [dev]'s components too), else its components folder's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from training_support import quick, quick_flux2, tiny_latents

from fluxlora.common.storage import LocalStore
from fluxlora.models.base_model import check_single_file_base, resolve_base_model, single_file_model
from fluxlora.models.families import KONTEXT, family_for_model, get_family
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.single_file import describe_file
from fluxlora.models.single_file_write import write_folder_transformer
from fluxlora.models.tiny_family import write_tiny_family
from fluxlora.training.families import check_family
from fluxlora.training.memory.architecture import read_model_shape
from fluxlora.training.trainer import TrainCallbacks, train_lora
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument

FAMILIES = ("flux1-dev", "chroma", "flux2-klein", "flux2-dev")
FLUX2 = ("flux2-klein", "flux2-dev")


@pytest.fixture(scope="module", params=FAMILIES)
def family_models(request, tmp_path_factory) -> dict[str, Path]:
    """The family's tiny folder, a components folder without transformer weights, and its
    transformer as BFL, ComfyUI and fp8 ComfyUI single files."""
    return _models(request.param, tmp_path_factory.mktemp(f"single-{request.param}"))


def _models(family: str, root: Path) -> dict:
    folder = write_tiny_family(family, root / "folder")
    components = root / "components"
    shutil.copytree(folder, components, ignore=lambda where, names: [n for n in names if Path(where).name ==
                                                                     "transformer" and n != "config.json"])
    files = {name: write_folder_transformer(folder, root / f"{name}.safetensors", layout=layout, fp8=fp8)
             for name, layout, fp8 in (("bfl", "bfl", False), ("comfyui", "comfyui", False),
                                       ("fp8", "comfyui", True))}
    return {"family": family, "folder": folder, "components": components, **files}


def _resolved(models, name: str, tmp_path: Path) -> Path:
    return resolve_base_model(str(models[name]), str(models["components"]), LocalStore(tmp_path / "store"),
                              tmp_path / "cache")



@pytest.fixture(scope="module")
def folder_render(family_models) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The folder's transformer weights and rendered latents, which each file's must equal."""
    pipe = load_flux_pipeline(family_models["folder"], "cpu", torch.float32)
    return pipe.transformer.state_dict(), tiny_latents(pipe)


def test_the_header_tells_family_layout_shape_and_dtype(family_models):
    config = json.loads((family_models["folder"] / "transformer" / "config.json").read_text())
    for name, layout in (("bfl", "bfl"), ("comfyui", "comfyui"), ("fp8", "comfyui")):
        model = describe_file(family_models[name])
        assert (model.family, model.layout) == (family_models["family"], layout)
        assert {k: config[k] for k in model.config} == model.config
        assert model.families == (("flux1-dev", "flux1-kontext") if model.family == "flux1-dev" else (model.family,))
    fp8 = describe_file(family_models["fp8"])
    assert fp8.is_fp8 and fp8.weight_bytes == fp8.parameters  # one byte a parameter
    assert describe_file(family_models["bfl"]).weight_bytes == 4 * fp8.parameters  # the tiny model is fp32


@pytest.mark.parametrize("name", ["bfl", "comfyui"])
def test_a_single_file_loads_and_renders_as_its_folder(family_models, folder_render, name, tmp_path):
    base = _resolved(family_models, name, tmp_path)
    assert family_for_model(base) is get_family(family_models["family"])
    from_file = load_flux_pipeline(base, "cpu", torch.float32)
    expected, rendered = folder_render
    loaded = from_file.transformer.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    # Equal weights, but the file's tensors sit at other memory alignments (views into the file's
    # buffer), so the CPU's vector kernels may sum in another order: float noise, ~1e-6 (FLUX.2).
    torch.testing.assert_close(tiny_latents(from_file), rendered, rtol=0, atol=1e-5)


def test_an_fp8_file_loads_upcast_to_the_runs_dtype(family_models, tmp_path):
    base = _resolved(family_models, "fp8", tmp_path)
    pipe = load_flux_pipeline(base, "cpu", torch.float32)
    folder = load_flux_pipeline(family_models["folder"], "cpu", torch.float32).transformer.state_dict()
    for key, value in pipe.transformer.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, folder[key].to(torch.float8_e4m3fn).float(), rtol=0, atol=0, msg=key)
    # ... and through the 8-bit base path, whose blocks hold one byte a weight again.
    eight_bit = load_flux_pipeline(base, "cpu", torch.float32, base_quantization="fp8")
    assert any(p.dtype == torch.float8_e4m3fn for p in eight_bit.transformer.state_dict().values())
    assert torch.isfinite(tiny_latents(eight_bit)).all()


def test_the_planner_reads_the_same_shape_from_the_header_as_from_the_folder(family_models):
    for name in ("bfl", "comfyui", "fp8"):
        shape = read_model_shape(str(family_models[name]), None, str(family_models["components"]))
        folder = read_model_shape(str(family_models["folder"]))
        assert shape.cache_key() == folder.cache_key()


def test_a_store_file_is_read_by_its_header_and_fetched_once(family_models, store, tmp_path):
    """Both stores: the header is a ranged read (ArtifactStore.get_range), the weights one download."""
    store.put_file("models/flux.safetensors", family_models["comfyui"])
    store.upload_dir(family_models["components"], "models/components")
    ref, components = "store://models/flux.safetensors", "store://models/components"
    assert single_file_model(ref, store) == describe_file(family_models["comfyui"])
    assert read_model_shape(ref, store, components).cache_key() == \
        read_model_shape(str(family_models["folder"])).cache_key()
    base = resolve_base_model(ref, components, store, tmp_path / "cache")
    get_file = store.get_file

    def get_small_file(key, path):  # the components' JSON configs are read at each check
        assert not key.endswith(".safetensors"), f"{key} fetched again"
        return get_file(key, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "get_file", get_small_file)
        patch.setattr(store, "download_prefix", lambda *a: pytest.fail(f"fetched again: {a}"))
        assert resolve_base_model(ref, components, store, tmp_path / "cache") == base
    pipe = load_flux_pipeline(base, "cpu", torch.float32)
    assert type(pipe).__name__ == get_family(family_models["family"]).pipeline_class.__name__


def _losses(cfg, model_dir: Path, dataset: Path, out: Path) -> list[float]:
    seen: list[float] = []
    train_lora(cfg, model_dir, dataset, out, device="cpu",
               callbacks=TrainCallbacks(on_step=lambda step, total, loss, lr: seen.append(loss)))
    return seen


def test_a_single_file_trains_the_same_losses_as_its_folder(family_models, make_dataset, shape_image, tmp_path):
    if family_models["family"] == "chroma":
        pytest.skip("the trainer sees the same folder either way: Chroma's file loads as its folder (above)")
    dataset = make_dataset({"circle": (shape_image((64, 64), "red"), "a red circle")})
    cfg = (quick_flux2 if family_models["family"] in FLUX2 else quick)(max_steps=2)
    from_file = _losses(cfg, _resolved(family_models, "bfl", tmp_path), dataset, tmp_path / "file")
    assert from_file == pytest.approx(_losses(cfg, family_models["folder"], dataset, tmp_path / "folder"), abs=1e-6)


def test_a_bad_file_or_components_folder_is_refused_naming_it_and_the_fix(family_models, tmp_path):
    store = LocalStore(tmp_path / "store")
    components = str(family_models["components"])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 not a safetensors file at all")
    with pytest.raises(InvalidArgument, match=r"junk\.safetensors is not a safetensors file.*flux1-dev\.safetensors"):
        check_single_file_base(str(junk), components, store)
    unknown = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.weight": torch.zeros(2)}, unknown)
    with pytest.raises(InvalidArgument, match=r"sdxl\.safetensors has no FLUX transformer keys.*BFL key"):
        check_single_file_base(str(unknown), components, store)
    truncated = tmp_path / "flux2.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "img_in.weight": torch.zeros(2, 4),
               "single_stream_modulation.lin.weight": torch.zeros(6, 2)}, truncated)
    with pytest.raises(InvalidArgument, match=r"flux2\.safetensors looks like a flux2-klein transformer but lacks "
                                              r"its 'double_blocks\.0\.img_attn\.norm\.query_norm\.scale' tensor"):
        check_single_file_base(str(truncated), components, store)
    ckpt = tmp_path / "flux.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(InvalidArgument, match=r"flux\.ckpt.*not a \.safetensors file"):
        check_single_file_base(str(ckpt), components, store)
    file = str(family_models["bfl"])
    with pytest.raises(FailedPrecondition, match=r"bfl\.safetensors is a single .* no components .*base_components"):
        check_single_file_base(file, "", store)
    with pytest.raises(FailedPrecondition, match=r"folder '/nowhere' .* is missing.*FLUXLORA_BASE_COMPONENTS"):
        check_single_file_base(file, "/nowhere", store)
    other = "chroma" if family_models["family"] == "flux1-dev" else "flux1-dev"
    wrong = write_tiny_family(other, tmp_path / "other")
    with pytest.raises(InvalidArgument, match=rf"is a {family_models['family']} transformer but its components "
                                              rf"folder .* is a {other} model"):
        check_single_file_base(file, str(wrong), store)


def test_a_single_file_server_default_counts_caption_tokens_with_its_components_tokenizers(family_models):
    from fluxlora.common.config import Settings
    from fluxlora.models.single_file import text_model_folder

    file, components = str(family_models["comfyui"]), str(family_models["components"])
    settings = Settings(base_model=file, base_components=components)
    assert text_model_folder(file, settings) == components
    assert text_model_folder(str(family_models["folder"]), settings) == str(family_models["folder"])
    # Without FLUXLORA_BASE_COMPONENTS, a folder base model is its own components folder.
    assert text_model_folder(file, Settings(base_model=str(family_models["folder"]))) == str(family_models["folder"])


def test_a_flux2_file_of_the_other_variant_or_family_is_refused_naming_it_and_the_fix(family_models, tmp_path):
    if family_models["family"] not in FLUX2:
        pytest.skip("a FLUX.2 case: its two variants' files differ by the guidance embedding alone")
    store, file = LocalStore(tmp_path / "store"), str(family_models["bfl"])
    other = "flux2-dev" if family_models["family"] == "flux2-klein" else "flux2-klein"
    with pytest.raises(InvalidArgument, match=rf"bfl\.safetensors is a {family_models['family']} model, not "
                                              rf"{other}: set family to '{family_models['family']}'"):
        check_family(file, other, store, components=str(family_models["components"]))
    folder = write_tiny_family(other, tmp_path / other)
    with pytest.raises(InvalidArgument, match=rf"bfl\.safetensors is a {family_models['family']} transformer but "
                                              rf"its components folder .* is a {other} model: set base_components"):
        check_single_file_base(file, str(folder), store)


@pytest.fixture(scope="module")
def kontext_models(tmp_path_factory) -> dict:
    """A Kontext transformer as a BFL file (flux1-kontext-dev.safetensors: FLUX.1 [dev]'s keys and
    shapes) with its Kontext components folder, and FLUX.1 [dev]'s components folder."""
    root = tmp_path_factory.mktemp("single-kontext")
    models = _models("flux1-kontext", root)
    dev = write_tiny_family("flux1-dev", root / "flux1-dev")
    return {**models, "dev_components": dev}


def test_a_kontext_file_is_the_family_its_components_folder_says(kontext_models, tmp_path):
    store, file = LocalStore(tmp_path / "store"), str(kontext_models["bfl"])
    kontext, dev = str(kontext_models["components"]), str(kontext_models["dev_components"])
    assert describe_file(kontext_models["bfl"]).family == "flux1-dev"  # the header cannot tell
    assert check_single_file_base(file, kontext, store).family == "flux1-kontext"
    assert check_single_file_base(file, dev, store).family == "flux1-dev"
    for named in ("", "flux1-kontext"):
        check_family(file, named, store, components=kontext)  # agrees: no error
    assert read_model_shape(file, None, kontext).cache_key() == \
        read_model_shape(str(kontext_models["folder"])).cache_key()
    assert read_model_shape(file, None, kontext).family == "flux1-kontext"
    # Named Kontext with FLUX.1 [dev]'s components (a ComfyUI user's flux1-kontext-dev.safetensors with the
    # FLUX.1 [dev] components they have): the two families' components are the same models.
    check_family(file, "flux1-kontext", store, components=dev)
    assert check_single_file_base(file, dev, store, "flux1-kontext").family == "flux1-kontext"
    with pytest.raises(InvalidArgument, match=r"bfl\.safetensors is a flux1-dev model, not chroma: set family to"):
        check_family(file, "chroma", store, components=dev)


@pytest.mark.parametrize("components", ["components", "dev_components"])
def test_a_kontext_file_trains_as_kontext_with_kontext_or_flux1_dev_components(kontext_models, components,
                                                                               make_dataset, shape_image, tmp_path):
    base = resolve_base_model(str(kontext_models["bfl"]), str(kontext_models[components]),
                              LocalStore(tmp_path / "store"), tmp_path / "cache", "flux1-kontext")
    assert family_for_model(base) is KONTEXT  # the composed folder's model_index names the Kontext pipeline
    pair = make_dataset({"edit": (shape_image((64, 64), "red"), "make the blue square a red circle")})
    (pair / "control").mkdir()
    shape_image((64, 64), "blue", "rectangle").save(pair / "control" / "edit.png")
    cfg = quick(max_steps=3, family="flux1-kontext")
    from_file = _losses(cfg, base, pair, tmp_path / "file")
    assert from_file == pytest.approx(_losses(cfg, kontext_models["folder"], pair, tmp_path / "folder"), abs=1e-6)


def test_write_tiny_writes_a_flux2_single_file(tmp_path):
    import typer
    from typer.testing import CliRunner

    from fluxlora.server.cli import register

    app = typer.Typer()
    register(app)
    done = CliRunner().invoke(app, ["models", "write-tiny", "--family", "flux2-klein", "--single-file", "bfl",
                                    str(tmp_path)])
    assert done.exit_code == 0, done.output
    model = describe_file(tmp_path / "tiny-flux2-klein.safetensors")
    assert (model.family, model.layout, model.config["guidance_embeds"]) == ("flux2-klein", "bfl", False)
    assert {"double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight",
            "double_blocks.0.img_mlp.0.weight", "final_layer.adaLN_modulation.1.weight"} <= model.keys


def test_write_tiny_writes_a_single_file_and_its_components_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from fluxlora.server.cli import register

    app = typer.Typer()
    register(app)
    done = CliRunner().invoke(app, ["models", "write-tiny", "--single-file", "comfyui", "--fp8", str(tmp_path)])
    assert done.exit_code == 0, done.output
    model = describe_file(tmp_path / "tiny-flux1-dev.safetensors")
    assert (model.family, model.layout, model.dtype) == ("flux1-dev", "comfyui", "F8_E4M3")
    assert (tmp_path / "tiny-flux1-dev" / "model_index.json").is_file()
    refused = CliRunner().invoke(app, ["models", "write-tiny", "--single-file", "ckpt", str(tmp_path)])
    assert refused.exit_code == 2 and "use 'bfl' or 'comfyui'" in refused.output


def test_a_store_object_that_is_not_safetensors_is_refused_without_reading_it_whole(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("models/flux1-dev.safetensors", b"<html>" + b"x" * 1000)
    reads: list[int] = []
    get_range = store.get_range
    store.get_range = lambda key, start, length: reads.append(length) or get_range(key, start, length)  # type: ignore
    with pytest.raises(InvalidArgument, match=r"store://models/flux1-dev\.safetensors is not a safetensors file"):
        check_single_file_base("store://models/flux1-dev.safetensors", str(tmp_path), store)
    assert reads == [8]
