"""Everything a training run can be told, validated before any model is loaded."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fluxlora.models.families import FAMILY_NAMES
from fluxlora.training.trainer.targets import ALL_LINEAR_TARGETS, ATTENTION_TARGETS, check_entry

LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
TimestepSampling = Literal["uniform", "sigmoid", "shift", "flux_shift"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
BaseQuantization = Literal["none", "fp8", "int8"]
CompileBlocks = Literal["auto", "on", "off"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy"]
# Optimizer state per trainable (fp32) parameter: AdamW's two fp32 moments; bitsandbytes' 8-bit
# AdamW keeps them in one byte each; Prodigy keeps four fp32 tensors (moments, s, initial weights).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
_OPTIMIZER_PACKAGES = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes, on a CUDA training node"),
                       "prodigy": ("prodigyopt", "pip install prodigyopt")}

DEFAULT_TARGETS = ATTENTION_TARGETS
# Every linear layer of the attention and MLPs of both streams in the double and single blocks
# (see targets.py for what is left out): more capacity per rank, at more step time than attention.
ATTENTION_AND_MLP_TARGETS = ALL_LINEAR_TARGETS

# Image sides must survive the VAE (8x on FLUX.1) and 2x2 packing: 16 divides both.
SIDE_MULTIPLE = 16


class TrainConfig(BaseModel):
    """A LoRA training run. Unknown fields are rejected so that a typo is an error, not a default.

    resolution: the long side images are trained at; a positive multiple of 16 (FLUX latents are
        1/8 of the image and packed 2x2). 512/768/1024 are usual; tests use 64.
    timestep_sampling: how the noise level sigma in [0, 1] is drawn each step.
        "uniform": U(0, 1). "sigmoid": sigmoid(N(0, sigmoid_scale)), concentrating on mid
        noise levels (kohya/SimpleTuner default for FLUX). "shift": sigmoid, then shifted toward
        noise by timestep_shift like the scheduler's static shift. "flux_shift": the
        resolution-dependent shift FLUX uses at inference (from the scheduler's config).
    guidance: the distilled guidance value fed to transformers with guidance_embeds
        (FLUX.1-dev); ignored by ones without.
    target_modules: module names (peft's rule: the name or a name ending in "." + it) or regular
        expressions matching whole module names; presets and the exact modules they name in
        targets.py (DEFAULT_TARGETS: attention; ATTENTION_AND_MLP_TARGETS: every linear layer
        of the blocks' attention and MLPs, both streams).
    checkpoint_every / sample_every: in optimizer steps; 0 means only at the final step, which
        always gets a checkpoint (and samples, when sample_prompts are given).
    base_quantization: store the frozen base weights of the transformer blocks in 8 bits
        ("fp8" or "int8") instead of `precision`, about halving their memory.
    optimizer: "adamw" (torch), "adamw8bit" (bitsandbytes, CUDA only: a quarter of AdamW's state) or
        "prodigy" (prodigyopt; it sets its own step size, learning_rate is a multiplier, 1.0 usual).
    compile_blocks: torch.compile the transformer blocks (regional compilation); "auto" turns it on
        on CUDA only (compilation on the CPU costs more than it saves in short runs).
    family: the base model's family (models.families: "flux1-dev", "flux1-kontext", "chroma", "flux2-dev",
        "flux2-klein"); "" detects it from the model. Each family has its own text encoding, guidance
        handling and pipeline class.
    blocks_to_swap: keep this many transformer blocks in CPU memory and bring each to the GPU
        only while it runs, counted as kohya sd-scripts counts them for FLUX.1 (N // 2 double
        blocks and 2 * (N - N // 2) single blocks; at most 35 on FLUX.1).
    """

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(512, gt=0)
    max_steps: int = Field(3000, ge=1)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS), min_length=1
    )
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    seed: int = Field(42, ge=0)
    checkpoint_every: int = Field(750, ge=0)
    sample_every: int = Field(750, ge=0)
    sample_prompts: list[str] = Field(default_factory=list)
    sample_steps: int = Field(20, ge=1)
    guidance: float = Field(3.5, ge=0)
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    precision: Precision = "auto"
    gradient_checkpointing: bool = True
    base_quantization: BaseQuantization = "none"
    blocks_to_swap: int = Field(0, ge=0)
    compile_blocks: CompileBlocks = "auto"
    optimizer: Optimizer = "adamw"
    timestep_sampling: TimestepSampling = "sigmoid"
    sigmoid_scale: float = Field(1.0, gt=0)
    timestep_shift: float = Field(3.0, gt=0)
    max_sequence_length: int = Field(512, ge=1, le=512)
    weight_decay: float = Field(1e-4, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 turns clipping off
    family: str = ""

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value and value not in FAMILY_NAMES:
            raise ValueError(f"family must be one of {', '.join(FAMILY_NAMES)} (or empty to detect it), got {value!r}")
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution_fits_latents(cls, value: int) -> int:
        if value % SIDE_MULTIPLE:
            raise ValueError(
                f"resolution must be a multiple of {SIDE_MULTIPLE} (FLUX latents are 1/8 of the "
                f"image and packed in 2x2 patches), got {value}; 512, 768 or 1024 are usual"
            )
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(
                f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {value!r}"
            )
        return value

    @field_validator("target_modules")
    @classmethod
    def _named_modules(cls, value: list[str]) -> list[str]:
        for entry in value:
            check_entry(entry)
        return value

    @model_validator(mode="after")
    def _warmup_within_run(self) -> TrainConfig:
        if self.lr_warmup_steps > self.max_steps:
            raise ValueError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) exceeds max_steps ({self.max_steps})"
            )
        return self


def not_yet_runnable(cfg: TrainConfig) -> list[str]:
    """Options this trainer accepts (the memory planner estimates them) but cannot run yet, each
    with the reason; empty when the run can start."""
    missing = []
    if cfg.optimizer in _OPTIMIZER_PACKAGES:
        package, how = _OPTIMIZER_PACKAGES[cfg.optimizer]
        if importlib.util.find_spec(package) is None:
            missing.append(f"optimizer={cfg.optimizer} (needs the {package} package: {how})")
    return missing
