"""Where in a training step the bytes peak: each op's live bytes are filed under the part of the
step it runs in, so that a shallow model's step can stand for a deep one's.

The parts are the phase (forward, backward, optimizer) and, inside the transformer, the first and
the last block of each kind; everything between two such landmarks (the embedders, the final
layer, the loss) is its own part. Blocks of a kind are identical, so the live bytes at the same op
of block j are affine in j and peak at the first or the last block: the middle blocks need no part
of their own. Each part's peak is then affine in the number of blocks of each kind, which is what
fake_step's extrapolation needs; the step's peak as a whole is not (the peak moves from the
backward pass to the end of the forward pass as blocks are added).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fluxlora.models.base_layers import BLOCK_LISTS
from fluxlora.training.memory.live_bytes import LiveBytes

MIDDLE = "middle"  # a block between the first and the last: its peak is not a landmark


def position(index: int, count: int) -> str:
    if index == count - 1:
        return "last"  # a lone block is the last: the one nearest the loss
    return "first" if index == 0 else MIDDLE


@contextmanager
def labelled_segments(transformer: torch.nn.Module, tracker: LiveBytes) -> Iterator[_Phase]:
    """Label `tracker`'s ops by part of the step while the body runs the step; the body calls
    phase.forward(), phase.backward() and phase.optimizer() as it begins each."""
    phase = _Phase(tracker)
    handles = []
    for kind in BLOCK_LISTS:
        blocks = getattr(transformer, kind)
        for index, block in enumerate(blocks):
            where = position(index, len(blocks))
            handles.append(block.register_forward_pre_hook(phase.entering(kind, where, index == 0 and kind ==
                                                                          BLOCK_LISTS[0]), with_kwargs=True))
            handles.append(block.register_forward_hook(phase.leaving(kind, where)))
    try:
        yield phase
    finally:
        for handle in handles:
            handle.remove()


class _Phase:
    def __init__(self, tracker: LiveBytes):
        self.tracker = tracker
        self.name = "forward"

    def forward(self) -> None:
        self.name = "forward"
        self.tracker.label = "forward/before blocks"

    def backward(self) -> None:
        self.name = "backward"
        self.tracker.label = "backward/after blocks"

    def optimizer(self) -> None:
        self.name = "optimizer"
        self.tracker.label = "optimizer"

    def entering(self, kind: str, where: str, first_of_all: bool):
        def hook(module, args, kwargs):
            # In the backward pass a checkpointed block's recompute enters it again: the same part.
            self.tracker.label = f"{self.name}/{kind}/{where}"
            if first_of_all and self.name == "forward":
                # Past the first block, the backward pass goes on into the embedders (LoRA on them).
                self._on_gradient((*args, *kwargs.values()), "backward/before blocks")
        return hook

    def leaving(self, kind: str, where: str):
        def hook(module, args, output):
            if self.name != "forward":
                return  # a recompute inside the backward pass
            if where == "last":
                self.tracker.label = f"forward/after {kind}"
            # The backward pass reaches this block when the gradient of its output arrives.
            self._on_gradient(output if isinstance(output, tuple) else (output,), f"backward/{kind}/{where}")
        return hook

    def _on_gradient(self, tensors, label: str) -> None:
        def hook(grad):
            self.tracker.label = label

        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(hook)
