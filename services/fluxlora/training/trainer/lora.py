"""The trainable part of a run: peft LoRA layers on the frozen transformer."""

from __future__ import annotations

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils.error import NoMatchingPeftModuleError

from fluxlora.models.base_layers import QUANTIZED_DTYPES, freeze_base
from fluxlora.models.families import family_of_transformer
from fluxlora.training.trainer.checkpoint import ADAPTER_NAME
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.targets import for_family, peft_target_modules


def add_lora(transformer, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Add the run's LoRA adapter to the layers cfg.target_modules names (names as peft matches
    them, or whole-name regular expressions: targets.py); returns the trainable parameters (fp32)."""
    entries = for_family(cfg.target_modules, family_of_transformer(transformer).target_presets)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=peft_target_modules(entries),
        init_lora_weights="gaussian",
    )
    # peft draws the initial LoRA weights from the global RNG: seed it, privately.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            transformer.add_adapter(lora, adapter_name=ADAPTER_NAME)
        except NoMatchingPeftModuleError as exc:
            raise ValueError(_no_match(cfg)) from exc
    # Base weights may be bf16; the trained parameters and their optimizer state stay fp32.
    cast_training_params(transformer, dtype=torch.float32)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError(_no_match(cfg))
    return params


def _no_match(cfg: TrainConfig) -> str:
    return (f"target_modules {cfg.target_modules} matched no layer of the transformer "
            "(names such as to_q, to_k, to_v, to_out.0, proj_mlp, ff.net.2, or regular expressions matching "
            r"whole names such as transformer_blocks\.\d+\.ff_context\.net\.2)")


def prepare_transformer(transformer, cfg: TrainConfig, device: torch.device | None = None) -> list[torch.nn.Parameter]:
    """LoRA, 8-bit and swapped base layers and gradient checkpointing as configured, train mode;
    returns the trainable parameters. With `device`, quantised layers are made there one by one and
    swapped ones go to CPU memory (the caller moves the rest), so a full-precision FLUX.1 never has
    to fit the GPU.

    The memory planner prepares its meta-device transformer with this same function."""
    params = add_lora(transformer, cfg)
    # After the LoRA: peft would otherwise cast its new layers to the base layer's 8-bit dtype. (The
    # layers an fp8 single file loaded 8-bit, models.single_file_fp8, are there before it: peft casts
    # to a base layer's `compute_dtype` where it has one, as FrozenLinear has.)
    freeze_base(transformer, cfg.base_quantization, _compute_dtype(transformer), device, cfg.blocks_to_swap)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return params


def _compute_dtype(transformer) -> torch.dtype:
    """The dtype the frozen base weights were loaded in (bf16 on a GPU): 8-bit weights upcast to it.
    Blocks an fp8 file loaded 8-bit already (models.single_file_fp8) do not count."""
    frozen = (p.dtype for p in transformer.parameters()
              if not p.requires_grad and p.is_floating_point() and p.dtype not in QUANTIZED_DTYPES.values())
    return next(frozen, torch.float32)
