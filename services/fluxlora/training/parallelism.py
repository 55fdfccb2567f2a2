"""Whether this server can train a spec's `gpus` x `nodes` processes (trainer/distributed.py), refused
at submit with the setting that would allow it."""

from __future__ import annotations

import torch

from fluxlora.common.config import Settings
from fluxlora_api.shared.errors import FailedPrecondition
from fluxlora_api.v1 import training_pb2 as pb

MAX_GPUS = 8  # GPUs of one node: the launcher starts one process per GPU
MAX_NODES = 16


def check_parallelism(spec: pb.TrainSpec, settings: Settings) -> None:
    """FAILED_PRECONDITION when the runner cannot start the processes the spec asks for."""
    gpus, nodes = max(1, spec.gpus), max(1, spec.nodes)
    if nodes > 1 and settings.runner != "kubernetes":
        # Across nodes the cluster starts the pods (an Indexed Job, fluxlora.jobs.k8s_manifests).
        raise FailedPrecondition(
            f"spec.nodes is {nodes}: training across nodes needs FLUXLORA_RUNNER=kubernetes (FLUXLORA_RUNNER is "
            f"{settings.runner}); on one machine use spec.gpus alone")
    if gpus == 1:
        return
    if settings.runner == "local":
        raise FailedPrecondition(
            f"spec.gpus is {gpus}: the local runner trains in the server's own thread, one process; set "
            "FLUXLORA_RUNNER=process (or kubernetes) to train on several GPUs")
    if settings.runner == "process":
        visible = _cuda_devices(settings)
        if visible is not None and visible < gpus:
            raise FailedPrecondition(
                f"spec.gpus is {gpus} but this machine has {visible} CUDA GPU(s) (CUDA_VISIBLE_DEVICES limits "
                f"them); ask for at most {visible}")


def _cuda_devices(settings: Settings) -> int | None:
    """The CUDA GPUs the process runner's workers would see; None when they train on the CPU
    (FLUXLORA_DEVICE=cpu, or no CUDA): gloo then runs `gpus` CPU processes, as the tests do."""
    if settings.device == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.device_count()
