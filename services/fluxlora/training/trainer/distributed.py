"""Data-parallel training: N processes (one per GPU) train one LoRA through torch.distributed.

A launcher starts the processes and sets torch's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): `torchrun --nproc-per-node N` (the process runner, a Kubernetes Job's
pod) or any engine that sets them. Rendezvous is torch's; nothing here opens sockets.

- Global batch = batch_size x world size. The batcher deals global batches (the same on every
  rank, from the seed) and each rank trains a contiguous slice of each.
- Every rank draws the random numbers of the whole global batch (caption dropout, noise,
  timesteps) from the same seeded generator and keeps its slice's: the run is the one-process run
  at the same global batch, up to float summation order, and its resume state is the one-process
  state (generator, batcher, optimizer).
- After the backward passes of a step, the LoRA gradients and the loss are summed over the ranks
  in one all-reduce (each rank's loss is already weighted by its share of the batch). The
  optimizer then takes the same step on every rank, so the parameters stay identical without
  ever being sent again.
- Rank 0 alone writes checkpoints, samples and plots and reports progress; every rank loads a
  checkpoint on resume.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fluxlora.training.trainer.callbacks import TrainCallbacks

log = logging.getLogger(__name__)

# Rank 0 renders samples and writes checkpoints while the others wait in the next all-reduce:
# longer than torch's 10-minute NCCL default, so a slow sample grid is not taken for a hang.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DataParallel:
    """Where this process stands among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes and reports."""
        return self.rank == 0

    def shard(self, size: int) -> slice:
        """This rank's contiguous part of a global batch of `size` samples. Sizes differ by at most
        one; a bucket's last, short batch may leave a rank nothing (it then adds zero gradients)."""
        return slice(size * self.rank // self.world_size, size * (self.rank + 1) // self.world_size)


def from_env() -> DataParallel:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK; one process when they are unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} from the launcher do not fit together")
    return DataParallel(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))))


def join(dp: DataParallel, device: torch.device | str | None) -> tuple[torch.device | str | None, bool]:
    """Joins the process group when there is more than one rank: nccl on CUDA (each rank on GPU
    LOCAL_RANK), gloo on the CPU. Returns this rank's device and whether this call created the group
    (its caller then destroys it)."""
    if dp.world_size == 1:
        return device, False
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", dp.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d joined (%s, device %s)", dp.rank, dp.world_size, dist.get_backend(), device)
    return device, True


def leave(created: bool) -> None:
    """Destroys a group join() created. No barrier first: every rank leaves the loop at the same step,
    and one that failed must not keep the others waiting."""
    if created and dist.is_initialized():
        dist.destroy_process_group()


def follower_callbacks(callbacks: TrainCallbacks) -> TrainCallbacks:
    """What a rank other than 0 keeps of its caller's callbacks: stopping, never reporting."""
    return dataclasses.replace(TrainCallbacks(), should_stop=callbacks.should_stop, preparing=callbacks.preparing)


def any_rank(dp: DataParallel, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any: a stop (a SIGTERM seen at different steps) must end
    every rank at the same step, or the others would wait for it in the next all-reduce."""
    if dp.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_comm_device(device))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_parameters(dp: DataParallel, params: list[torch.nn.Parameter]) -> None:
    """Rank 0's LoRA weights on every rank. They start equal anyway (seeded initialisation, or the
    same checkpoint): this guards against a rank whose libraries initialise differently."""
    if dp.world_size == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def reduce_gradients(dp: DataParallel, params: list[torch.nn.Parameter], loss: float) -> float:
    """Sums the LoRA gradients and `loss` (this rank's weighted share) over the ranks, in place; returns
    the summed loss: the global batch's. One process: nothing to do."""
    if dp.world_size == 1:
        return loss
    device = params[0].device
    # One flat buffer, one all-reduce per step instead of one per LoRA tensor (hundreds of them, each
    # small): the loss rides along. A rank whose slice was empty adds zeros.
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([loss], dtype=grads[0].dtype, device=device)])
    comm = flat.to(_comm_device(device))
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    flat = comm.to(device)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return float(flat[offset].item())


def _comm_device(device: torch.device) -> torch.device:
    """nccl reduces CUDA tensors only; gloo, CPU ones."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")
