"""Peak memory of a training run, measured as it goes: on CUDA the most memory the run's tensors held
(torch.cuda.max_memory_allocated since the run started; the loop resets the counter), and always
the peak resident set of the process the run is in (getrusage ru_maxrss: the worker process under
FLUXLORA_RUNNER=process, the whole server otherwise). Both only ever grow during a run."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

GIB = 2**30


@dataclass(frozen=True)
class PeakMemory:
    device_bytes: int  # CUDA tensors' peak since the run started; 0 off CUDA
    process_rss_bytes: int  # the process's peak resident set since it started

    def metrics(self) -> dict[str, float]:
        """Job metrics, named after what was measured: peak_memory_gib (CUDA only) and peak_rss_gib."""
        values = {"peak_rss_gib": self.process_rss_bytes / GIB}
        if self.device_bytes:
            values["peak_memory_gib"] = self.device_bytes / GIB
        return values


def process_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> PeakMemory:
    device_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return PeakMemory(device_bytes=device_bytes, process_rss_bytes=process_peak_rss_bytes())
