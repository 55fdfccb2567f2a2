"""memory_mode auto: the planner picks, for a target GPU, the fastest memory options that fit,
keeping the ones a request set. A planner with FLUX.1-dev's estimated peaks at 1024 (GiB,
docs/performance.md) stands in for the fake step; one test runs the real fake step."""

from __future__ import annotations

import pytest

from fluxlora.training.memory import FLUX1_DEV, MemoryEstimate, MemoryPlanner
from fluxlora.training.memory.auto import pick_memory_options
from fluxlora.training.memory.planner import describe_mode
from fluxlora.training.trainer.config import TrainConfig

# (gradient checkpointing, 8-bit base) -> estimated total GiB at 1024, nothing swapped
PEAKS = {(False, False): 51.2, (True, False): 26.2, (False, True): 56.1, (True, True): 15.5}
PER_SWAPPED_BLOCK = {False: 0.55, True: 0.27}  # GiB of block weights a swapped block frees (bf16, 8-bit)


class TablePlanner(MemoryPlanner):
    def __init__(self):
        super().__init__()
        self.asked: list[tuple] = []

    def estimate(self, shape, cfg: TrainConfig) -> MemoryEstimate:
        eight_bit = cfg.base_quantization != "none"
        self.asked.append((cfg.gradient_checkpointing, cfg.base_quantization, cfg.blocks_to_swap))
        total = PEAKS[cfg.gradient_checkpointing, eight_bit] - PER_SWAPPED_BLOCK[eight_bit] * cfg.blocks_to_swap
        return MemoryEstimate(round(total, 3), total - 1.5, 10.0, 1.5, describe_mode(cfg))


def pick(target: float, given: set[str] = frozenset(), **options):
    return pick_memory_options(TablePlanner(), FLUX1_DEV, TrainConfig(resolution=1024, **options), target, given)


def test_a_24gib_card_gets_an_8bit_base_with_checkpointing_and_is_told_why():
    choice = pick(24)
    assert choice.changes == {"gradient_checkpointing": True, "base_quantization": "fp8", "blocks_to_swap": 0}
    assert choice.estimate.total_gib == 15.5
    said = choice.describe()
    assert said.startswith("memory_mode auto picked fp8 base + gradient checkpointing")
    assert "bf16 base + gradient checkpointing would need 26.2 GiB" in said and "of the target GPU's 24.0 GiB" in said


def test_a_large_card_keeps_the_fastest_bf16_base():
    choice = pick(80)
    assert choice.changes == {"gradient_checkpointing": True, "base_quantization": "none", "blocks_to_swap": 0}
    assert "the fastest combination, and it fits" in choice.describe()


def test_a_small_card_swaps_the_fewest_blocks_that_fit():
    choice = pick(12)
    n = choice.changes["blocks_to_swap"]
    assert choice.changes["base_quantization"] == "fp8" and choice.estimate.total_gib <= 12
    assert 15.5 - 0.27 * (n - 1) > 12  # one block fewer would not fit
    assert f"{n} blocks swapped to the CPU" in choice.describe()


def test_an_explicit_choice_wins():
    choice = pick(24, given={"base_quantization"}, base_quantization="none")
    assert choice.changes["base_quantization"] == "none" and choice.changes["blocks_to_swap"] > 0
    assert choice.estimate.total_gib <= 24 and "base_quantization kept as given" in choice.describe()
    kept = pick(24, given={"base_quantization", "blocks_to_swap"}, base_quantization="int8", blocks_to_swap=2)
    assert kept.changes == {"gradient_checkpointing": True, "base_quantization": "int8", "blocks_to_swap": 2}


def test_nothing_picked_when_nothing_fits_or_a_given_option_rules_it_out():
    assert pick(6) is None  # 35 blocks swapped (all it allows) still need 6.05
    planner = TablePlanner()
    assert pick_memory_options(planner, FLUX1_DEV, TrainConfig(resolution=1024, gradient_checkpointing=False), 24,
                               {"gradient_checkpointing"}) is None
    assert all(not quantized or quantized == "none" for ckpt, quantized, _ in planner.asked if not ckpt)


@pytest.mark.slow
def test_full_size_flux1_dev_at_1024_on_24gib_picks_fp8_with_checkpointing(tmp_path):
    """Two fake steps of the 12B-parameter model (~5-10 s each on one core)."""
    choice = pick_memory_options(MemoryPlanner(tmp_path), FLUX1_DEV, TrainConfig(resolution=1024), 24, set())
    assert choice.changes == {"gradient_checkpointing": True, "base_quantization": "fp8", "blocks_to_swap": 0}
    assert 14 < choice.estimate.total_gib < 18  # measured on an H100: 13.7-14.0 GiB allocated
