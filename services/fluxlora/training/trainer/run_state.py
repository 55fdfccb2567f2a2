"""What one training run's stages share: built by prepare.py, stepped by batch_step.py, saved and
restored by run_checkpoints.py, driven by loop.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fluxlora.models.families import Family
from fluxlora.training.trainer import distributed
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.data import BucketBatcher, CachedDataset


@dataclass
class Run:
    """What the step functions share; built once by train_lora."""

    cfg: TrainConfig
    family: Family
    pipe: object  # the family's diffusers pipeline
    data: CachedDataset
    batcher: BucketBatcher
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # every random draw of the loop, so runs repeat exactly
    device: torch.device
    dtype: torch.dtype
    params: list[torch.nn.Parameter]
    dp: distributed.DataParallel = field(default_factory=distributed.DataParallel)
    export_name: str = "lora"
    lora_metadata: dict[str, str] = field(default_factory=dict)
    history: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def transformer(self):
        return self.pipe.transformer
