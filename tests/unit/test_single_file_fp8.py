"""An fp8 single-file base (float8_e4m3fn, as ComfyUI's flux1-dev-fp8.safetensors) trained with an 8-bit
base (base_quantization fp8) keeps its own bytes: the blocks' linear weights go into the 8-bit base
layers as the file holds them, bit for bit, with no full-precision copy of them ever made; it renders
and trains exactly as the same file upcast does. A ComfyUI "scaled fp8" file keeps its bytes and its
scales; a quantisation fluxlora cannot read is refused naming the file and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from training_support import tiny_latents

from fluxlora.common.storage import LocalStore
from fluxlora.models.base_layers import FrozenLinear, freeze_base, frozen_linears
from fluxlora.models.base_model import check_single_file_base, resolve_base_model
from fluxlora.models.families import get_family
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.single_file import SingleFileError, describe_file
from fluxlora.models.single_file_fp8 import keeps_fp8, load_fp8_transformer
from fluxlora.models.single_file_load import load_single_file_transformer
from fluxlora.models.single_file_write import write_folder_transformer, write_single_file
from fluxlora.models.tiny_family import write_tiny_family
from fluxlora.models.tiny_flux import TEXT_DIM, TINY_TRANSFORMER
from fluxlora.training.trainer import TrainCallbacks, TrainConfig, train_lora
from fluxlora_api.shared.errors import InvalidArgument

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module", params=("flux1-dev", "chroma", "flux2-klein"))
def fp8_models(request, tmp_path_factory) -> dict[str, Path]:
    """The family's tiny folder, and its transformer as an fp8 and a scaled fp8 ComfyUI single file,
    each resolved with a components folder into the base model folder the trainer loads."""
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    folder = write_tiny_family(request.param, root / "folder")
    components = root / "components"
    shutil.copytree(folder, components, ignore=lambda where, names: [n for n in names if Path(where).name ==
                                                                     "transformer" and n != "config.json"])
    plain = write_folder_transformer(folder, root / "fp8.safetensors", layout="comfyui", fp8=True)
    full = write_folder_transformer(folder, root / "full.safetensors", layout="comfyui")
    scaled = _write_scaled_fp8(full, root / "scaled.safetensors")
    store, cache = LocalStore(root / "store"), root / "cache"
    return {"family": request.param, "folder": folder, "components": components, "fp8": plain, "scaled": scaled,
            "fp8 base": resolve_base_model(str(plain), str(components), store, cache),
            "scaled base": resolve_base_model(str(scaled), str(components), store, cache)}


def _write_scaled_fp8(full: Path, path: Path) -> Path:
    """ComfyUI's scaled fp8 convention: a scaled_fp8 marker, each linear weight stored divided by a scale
    that puts its largest value at e4m3's largest, and that scale beside it as <layer>.scale_weight."""
    state = {}
    for key, value in load_file(full).items():
        weight = value.float()
        if key.endswith(".weight") and value.dim() == 2:
            scale = weight.abs().amax() / torch.finfo(FP8).max
            state[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
            weight = weight / scale
        state[key] = weight.to(FP8)
    state["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(state, path)
    return path



def _block_linears(transformer) -> dict[str, torch.nn.Module]:
    names = {id(module): name for name, module in transformer.named_modules()}
    return {f"{names[id(parent)]}.{attribute}": getattr(parent, attribute)
            for parent, attribute, _ in frozen_linears(transformer)} | {
        name: module for name, module in transformer.named_modules() if isinstance(module, FrozenLinear)}


def test_an_fp8_file_for_an_fp8_base_keeps_the_files_bytes_in_its_blocks(fp8_models):
    folder = load_flux_pipeline(fp8_models["folder"], "cpu", torch.float32).transformer.state_dict()
    kept = load_flux_pipeline(fp8_models["fp8 base"], "cpu", torch.float32, base_quantization="fp8")
    upcast = load_flux_pipeline(fp8_models["fp8 base"], "cpu", torch.float32)
    layers = _block_linears(kept.transformer)
    assert layers and all(isinstance(layer, FrozenLinear) and layer.kind == "fp8" for layer in layers.values())
    for name, layer in layers.items():
        # The file holds the folder's weights cast to e4m3: the same bytes, untouched, scale 1 a row.
        assert torch.equal(layer.weight.view(torch.uint8), folder[f"{name}.weight"].to(FP8).view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, torch.ones(layer.out_features, 1))
    rest = {k: v for k, v in kept.transformer.state_dict().items() if v.dtype != FP8 and "weight_scale" not in k}
    expected = upcast.transformer.state_dict()
    assert rest.keys() == {k for k in expected if k.removesuffix(".weight") not in layers}
    for key, value in rest.items():  # embedders, norms, biases, the final layer: upcast as before
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(tiny_latents(kept), tiny_latents(upcast), rtol=0, atol=0)


class _WrittenBytes(TorchDispatchMode):
    """Bytes of one dtype that torch's operators write while active: every result that is not a view
    of its input, in-place ones included. Uninitialised allocations (empty) are never resident until
    written, and building a model with empty weights makes one per parameter before moving it to meta."""

    _UNWRITTEN = ("empty", "empty_strided", "empty_like")

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype, self.bytes = dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in self._UNWRITTEN:
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out)
                              if isinstance(t, torch.Tensor) and t.dtype == self.dtype and not t.is_meta)
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loading_it_never_makes_a_full_precision_copy_of_the_block_weights(fp8_models, dtype):
    """Everything written in the compute dtype while loading, freed or not, adds up to less than the
    block weights alone would take in it: no full-precision copy of them ever existed. The upcast
    path, measured the same way, makes one (so the measure would catch it)."""
    file, family = fp8_models["fp8"], get_family(fp8_models["family"])
    model = describe_file(file)
    with _WrittenBytes(dtype) as kept:
        transformer = load_fp8_transformer(file, model, family, fp8_models["components"], dtype)
    block_bytes = sum(layer.weight.numel() for layer in _block_linears(transformer).values()) * dtype.itemsize
    with _WrittenBytes(dtype) as upcast:
        load_single_file_transformer(file, model, family, fp8_models["components"], dtype)
    assert kept.bytes < block_bytes <= upcast.bytes


def test_an_fp8_base_from_an_fp8_file_trains_the_losses_of_the_file_upcast(fp8_models, make_dataset, shape_image,
                                                                          tmp_path, monkeypatch):
    """Exactly the losses of the same file upcast and trained on a full-precision base: the kept bytes
    times a scale of 1 are the upcast weights. Upcasting and then quantising (the way before) rounds
    each weight a second time onto its row's e4m3 grid, so its losses differ by that rounding."""
    if fp8_models["family"] != "flux1-dev":
        pytest.skip("one family is enough: the trainer sees the same layers either way")
    dataset = make_dataset({"circle": (shape_image((64, 64), "red"), "a red circle")})
    cfg = TrainConfig(resolution=64, max_steps=3, learning_rate=1e-3, rank=4, alpha=4, checkpoint_every=0,
                      sample_every=0, gradient_checkpointing=True, seed=0)

    def losses(quantization: str, out: str) -> list[float]:
        seen: list[float] = []
        train_lora(cfg.model_copy(update={"base_quantization": quantization}), fp8_models["fp8 base"], dataset,
                   tmp_path / out, device="cpu",
                   callbacks=TrainCallbacks(on_step=lambda step, total, loss, lr: seen.append(loss)))
        return seen

    kept = losses("fp8", "kept")
    assert kept == losses("none", "upcast")
    monkeypatch.setattr("fluxlora.models.loading.keeps_fp8", lambda model, storage: False)
    requantised = losses("fp8", "requantised")
    assert requantised != kept and requantised == pytest.approx(kept, rel=2e-3)


def test_a_scaled_fp8_file_keeps_its_bytes_with_its_scales_as_the_rows_scales(fp8_models):
    scaled = load_file(fp8_models["scaled"])
    kept = load_flux_pipeline(fp8_models["scaled base"], "cpu", torch.float32, base_quantization="fp8")
    upcast = load_flux_pipeline(fp8_models["scaled base"], "cpu", torch.float32)
    folder = load_flux_pipeline(fp8_models["folder"], "cpu", torch.float32).transformer.state_dict()
    stored = {scale.item() for key, scale in scaled.items() if key.endswith(".scale_weight")}
    layers = _block_linears(kept.transformer)
    for name, layer in layers.items():
        assert isinstance(layer, FrozenLinear) and layer.weight.dtype == FP8, name
        assert len(set(layer.weight_scale.flatten().tolist()) - stored) == 0, name  # one of the file's scales
        torch.testing.assert_close(layer.weight_for(torch.device("cpu")), upcast.transformer.get_submodule(name)
                                   .weight, rtol=0, atol=0, msg=name)
        # ... the weight meant, not the stored one: the folder's, to e4m3's precision (3 mantissa bits).
        torch.testing.assert_close(layer.weight_for(torch.device("cpu")), folder[f"{name}.weight"], rtol=2 ** -4,
                                   atol=layer.weight_scale.max().item() * 2 ** -9, msg=name)
    torch.testing.assert_close(tiny_latents(kept), tiny_latents(upcast), rtol=0, atol=0)


def test_the_kept_layers_swap_to_cpu_memory_like_the_trainers_own(tmp_path):
    config_dir = tmp_path / "components"
    transformer = get_family("flux1-dev").transformer_class(**{**TINY_TRANSFORMER, "num_layers": 2,
                                                               "num_single_layers": 4},
                                                            pooled_projection_dim=TEXT_DIM)
    transformer.save_config(config_dir / "transformer")
    file = write_single_file(transformer, tmp_path / "fp8.safetensors", dtype=FP8)
    loaded = load_fp8_transformer(file, describe_file(file), get_family("flux1-dev"), config_dir, torch.float32)
    before = {name: layer.weight.view(torch.uint8).clone() for name, layer in _block_linears(loaded).items()}
    freeze_base(loaded, "fp8", torch.float32, blocks_to_swap=1)  # kohya's count: the last two single blocks
    for name, layer in _block_linears(loaded).items():
        swapped = name.startswith(("single_transformer_blocks.2.", "single_transformer_blocks.3."))
        assert layer.swapped == swapped, name
        assert torch.equal((layer.host_weight if swapped else layer.weight).view(torch.uint8), before[name]), name


def _refused_file(tmp_path: Path, fp8_models, change) -> Path:
    state = load_file(fp8_models["scaled"])
    change(state)
    path = tmp_path / "quantised.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize("change, says", [
    (lambda s: s.update({"model.diffusion_model.img_in.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'),
                                                                                 dtype=torch.uint8)}),
     r"stores model\.diffusion_model\.img_in as 'nvfp4'"),
    (lambda s: s.update({"model.diffusion_model.img_in.scale_weight": torch.ones(4)}), r"4 scales \(block-wise\)"),
    (lambda s: s.update({"model.diffusion_model.img_in.weight": s["model.diffusion_model.img_in.weight"]
                         .to(torch.bfloat16)}), "a torch.bfloat16 weight"),
], ids=["nvfp4", "block-scales", "scaled-bf16"])
def test_a_quantisation_it_cannot_read_is_refused_naming_the_file_and_the_fix(fp8_models, tmp_path, change, says):
    path = _refused_file(tmp_path, fp8_models, change)
    family = get_family(fp8_models["family"])
    for load in (load_fp8_transformer, load_single_file_transformer):
        with pytest.raises(SingleFileError, match=rf"quantised\.safetensors .*{says}.*flux1-dev-fp8\.safetensors"):
            load(path, describe_file(path), family, fp8_models["components"], torch.float32)


@pytest.mark.parametrize("change, says", [
    (lambda s: s.update({"model.diffusion_model.img_in.weight": torch.zeros(4, 2, dtype=torch.uint8),
                         "model.diffusion_model.img_in.weight_scale": torch.ones(4, 1)}), "a U8 weight"),
    (lambda s: s.update({"model.diffusion_model.img_in.scale_weight": torch.ones(4)}), r"4 scales \(block-wise\)"),
], ids=["nvfp4-packed", "block-scales"])
def test_such_a_file_is_refused_at_submit_from_its_header(fp8_models, tmp_path, change, says):
    path = _refused_file(tmp_path, fp8_models, change)
    with pytest.raises(InvalidArgument, match=rf"quantised\.safetensors .*{says}.*flux1-dev-fp8\.safetensors"):
        check_single_file_base(str(path), str(fp8_models["components"]), LocalStore(tmp_path / "store"))


def test_other_quantisations_and_e5m2_files_take_the_upcast_path(fp8_models, tmp_path):
    model = describe_file(fp8_models["fp8"])
    assert keeps_fp8(model, "fp8")
    assert not keeps_fp8(model, "none") and not keeps_fp8(model, "int8")
    e5m2 = tmp_path / "e5m2.safetensors"
    save_file({k: v.float().to(torch.float8_e5m2) for k, v in load_file(fp8_models["fp8"]).items()}, e5m2)
    assert not keeps_fp8(describe_file(e5m2), "fp8")
    int8 = load_flux_pipeline(fp8_models["fp8 base"], "cpu", torch.float32, base_quantization="int8")
    assert {layer.kind for layer in _block_linears(int8.transformer).values()} == {"int8"}


def test_the_bfl_layout_keeps_its_bytes_too(fp8_models, tmp_path):
    bfl = tmp_path / "bfl.safetensors"
    save_file({k.removeprefix("model.diffusion_model."): v for k, v in load_file(fp8_models["fp8"]).items()}, bfl)
    family = get_family(fp8_models["family"])
    comfy = load_fp8_transformer(fp8_models["fp8"], describe_file(fp8_models["fp8"]), family,
                                 fp8_models["components"], torch.float32)
    plain = load_fp8_transformer(bfl, describe_file(bfl), family, fp8_models["components"], torch.float32)
    for (key, a), (_, b) in zip(comfy.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8
                           else b), key
