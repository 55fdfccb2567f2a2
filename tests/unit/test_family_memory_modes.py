"""The trainer's memory features on every model family's transformer: an 8-bit (fp8) base trains,
blocks swapped to CPU memory give the very same step as blocks that stay, and compiled blocks the
same step within float error.

Each family's tiny transformer (its own class and config: Chroma's pruned modulation, Kontext's
control tokens appended to the sequence, FLUX.2's guidance embedding or none) with 3 double and 4
single blocks, so that swapping keeps two of each and swaps the rest. The step is the trainer's own
(prepare_transformer, compile_blocks, flow_matching_loss) on the memory planner's step inputs, fed
as the family feeds its transformer. Compiled, the swapped blocks are compiled too.

Resume and the encoding cache are checked in each family's own test file; FLUX.2 [dev]'s encoding
cache is checked here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from training_support import quick_flux2, train

from fluxlora.models.base_layers import FrozenLinear, frozen_linears
from fluxlora.models.families import FAMILY_NAMES, get_family
from fluxlora.models.tiny_family import write_tiny_family
from fluxlora.training.memory import read_model_shape
from fluxlora.training.memory.architecture import ModelShape
from fluxlora.training.memory.fake_step import step_inputs
from fluxlora.training.trainer import TrainCallbacks, TrainConfig, train_lora
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora.training.trainer.lora import prepare_transformer
from fluxlora.training.trainer.step import compile_blocks, flow_matching_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Enough blocks to swap some of each kind: blocks_to_swap=2 keeps the last double block and the last
# two single blocks in CPU memory, and two of each stay.
BLOCKS = {"num_layers": 3, "num_single_layers": 4}
SWAPPED = {"transformer_blocks.2", "single_transformer_blocks.2", "single_transformer_blocks.3"}
# 32 px (64 image tokens), 8 text tokens, every linear layer of the blocks trained.
CFG = TrainConfig(resolution=32, max_sequence_length=8, batch_size=1, rank=4, alpha=4, precision="fp32",
                  base_quantization="fp8", target_modules=ATTENTION_AND_MLP_TARGETS)


@dataclass
class Step:
    loss: torch.Tensor
    grads: list[torch.Tensor]  # of the LoRA parameters, in the transformer's order
    names: list[str]  # of those parameters
    transformer: torch.nn.Module


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny model (`fluxlora models write-tiny`)."""
    return {family: write_tiny_family(family, tmp_path_factory.mktemp(family)) for family in FAMILY_NAMES}


@pytest.fixture(scope="module")
def shapes(model_dirs) -> dict[str, ModelShape]:
    """Each family's tiny model as the memory planner reads it, with BLOCKS blocks."""
    found = {}
    for family, model_dir in model_dirs.items():
        shape = read_model_shape(str(model_dir))
        assert shape.family == family
        found[family] = ModelShape({**shape.transformer, **BLOCKS}, shape.vae_scale_factor, shape.family)
    return found


def family_step(shape: ModelShape, quantization: str = "fp8", swap: int = 0, compiled: str = "off") -> Step:
    """One training step of the family's seeded transformer prepared as the trainer prepares it."""
    family = get_family(shape.family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = family.transformer_class.from_config(shape.transformer).requires_grad_(False)
        latents, noise, sigmas, embeds, pooled, text_ids = step_inputs(shape, CFG, torch.float32)
        control = torch.randn_like(latents) if family.takes_control_image else None
    # A text mask with padding, which only the families that attend with one (Chroma) are given.
    mask = torch.ones(embeds.shape[:2])
    mask[:, 5:] = 0
    cfg = CFG.model_copy(update={"base_quantization": quantization, "blocks_to_swap": swap})
    params = prepare_transformer(transformer, cfg)
    compile_blocks(transformer, compiled, torch.device("cpu"))
    loss = flow_matching_loss(transformer, latents, noise, sigmas, embeds, pooled, text_ids, 1.0, torch.float32,
                              mask=mask, family=family, control=control)
    loss.backward()
    names = [name for name, p in transformer.named_parameters() if p.requires_grad]
    return Step(loss.detach(), [p.grad for p in params], names, transformer)


@pytest.fixture(scope="module")
def fp8_steps(shapes) -> dict[str, Step]:
    """Each family's step on the 8-bit base, no block swapped, eager."""
    return {family: family_step(shape) for family, shape in shapes.items()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_an_8bit_base_trains_every_family(family, shapes, fp8_steps):
    step = fp8_steps[family]
    assert not frozen_linears(step.transformer)  # no full-precision linear layer is left in the blocks...
    block_layers = [m for name, m in step.transformer.named_modules()
                    if isinstance(m, FrozenLinear) and name.startswith(("transformer_blocks", "single_"))]
    assert block_layers and all(m.weight.dtype == torch.float8_e4m3fn for m in block_layers)  # ...by 8-bit ones
    assert torch.isfinite(step.loss)
    assert all(torch.isfinite(g).all() for g in step.grads)
    # peft starts lora_B at zero, so lora_A's first gradient is zero; every lora_B gets a signal.
    b_grads = [g for name, g in zip(step.names, step.grads, strict=True) if "lora_B" in name]
    assert b_grads and all(g.abs().sum() > 0 for g in b_grads)
    # fp8 with per-row scales computes the full-precision step within its rounding
    exact = family_step(shapes[family], quantization="none")
    assert abs(step.loss.item() - exact.loss.item()) < 0.05 * exact.loss.item()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_swapped_blocks_give_every_family_the_very_same_step(family, shapes, fp8_steps):
    step, swapped = fp8_steps[family], family_step(shapes[family], swap=2)
    held = {name: m for name, m in swapped.transformer.named_modules() if isinstance(m, FrozenLinear) and m.swapped}
    assert {".".join(name.split(".")[:2]) for name in held} == SWAPPED
    assert all(m.weight is None and m.host_weight.dtype == torch.float8_e4m3fn for m in held.values())
    assert torch.equal(step.loss, swapped.loss)
    assert all(torch.equal(a, b) for a, b in zip(step.grads, swapped.grads, strict=True))


# One family per transformer class: Kontext runs FLUX.1's blocks and [dev] [klein]'s, and FLUX.1's
# compiled blocks are checked in the fast tier (test_base_layers). A cold compile costs ~2 min a family.
COMPILED_CLASSES = ("chroma", "flux2-klein")


@pytest.mark.slow  # torch.compile of the family's two block types, forward and backward, on the CPU
@pytest.mark.parametrize("family", COMPILED_CLASSES)
def test_compiled_blocks_give_every_family_the_same_step(family, shapes, fp8_steps):
    step, compiled = fp8_steps[family], family_step(shapes[family], swap=2, compiled="on")
    assert torch.allclose(step.loss, compiled.loss, rtol=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(step.grads, compiled.grads, strict=True))


def test_a_flux2_dev_run_from_the_encoding_cache_trains_as_the_run_that_wrote_it(model_dirs, circle, tmp_path):
    """The encoding cache of FLUX.2 [dev] (Mistral-3's stacked layers, no pooled vector, no mask),
    as the other families' tests check theirs."""
    from fluxlora.training.trainer.encoding_cache import load_encodings

    model, cache = model_dirs["flux2-dev"], tmp_path / "encodings.safetensors"
    first = train(quick_flux2(), model, circle, tmp_path / "a", encoding_cache=cache)
    text = load_encodings(cache, circle).samples[0].text
    assert text.mask is None and text.pooled.numel() == 0 and text.prompt_embeds.shape == (64, 48)
    encoded_again = []
    second = train_lora(quick_flux2(), model, circle, tmp_path / "b", TrainCallbacks(on_encoded=encoded_again.append),
                        device="cpu", encoding_cache=cache)
    assert encoded_again == [] and second.losses == first.losses
