"""The torch side of training: FLUX LoRA on a local dataset directory, no gRPC, no store."""

from fluxlora.training.trainer.callbacks import TrainCallbacks
from fluxlora.training.trainer.checkpoint import LORA_WEIGHTS_NAME, latest_checkpoint
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.loop import TrainOutcome, train_lora

__all__ = [
    "LORA_WEIGHTS_NAME",
    "TrainCallbacks",
    "TrainConfig",
    "TrainOutcome",
    "latest_checkpoint",
    "train_lora",
]
