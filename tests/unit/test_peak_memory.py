"""Peak memory of a training run, reported after every step: the process's peak RSS always, the CUDA
tensors' peak (since the run started) on a GPU."""

from __future__ import annotations

import pytest
import torch

from fluxlora.training.trainer import TrainCallbacks, TrainConfig, train_lora
from fluxlora.training.trainer.peak_memory import GIB, PeakMemory


def quick_run(tiny_flux_dir, make_dataset, shape_image, out_dir, device: str):
    dataset = make_dataset({"circle": (shape_image((64, 64), "red"), "a red circle")})
    cfg = TrainConfig(resolution=64, max_steps=3, rank=4, alpha=4, checkpoint_every=0, sample_every=0,
                      gradient_checkpointing=False)
    seen: list[tuple[int, PeakMemory]] = []
    outcome = train_lora(cfg, tiny_flux_dir, dataset, out_dir,
                         TrainCallbacks(on_memory=lambda step, peak: seen.append((step, peak))), device=device)
    return outcome, seen


def test_every_step_reports_the_processes_peak_rss_and_no_gpu_figure_on_the_cpu(
        tiny_flux_dir, make_dataset, shape_image, tmp_path):
    outcome, seen = quick_run(tiny_flux_dir, make_dataset, shape_image, tmp_path, "cpu")
    assert [step for step, _ in seen] == [1, 2, 3]
    rss = [peak.process_rss_bytes for _, peak in seen]
    assert 0 < rss[0] <= rss[1] <= rss[2] <= outcome.peak_rss_bytes  # a peak never falls
    assert all(peak.device_bytes == 0 for _, peak in seen) and outcome.peak_memory_bytes == 0
    assert seen[-1][1].metrics() == {"peak_rss_gib": rss[-1] / GIB}


def test_metrics_name_what_was_measured():
    assert PeakMemory(device_bytes=3 * GIB, process_rss_bytes=GIB).metrics() == {
        "peak_memory_gib": 3.0, "peak_rss_gib": 1.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_every_step_reports_the_tensors_peak_since_the_run_started(
        tiny_flux_dir, make_dataset, shape_image, tmp_path):
    torch.ones(2**28, device="cuda").sum()  # 1 GiB before the run: not the run's
    outcome, seen = quick_run(tiny_flux_dir, make_dataset, shape_image, tmp_path, "cuda")
    device = [peak.device_bytes for _, peak in seen]
    assert 0 < device[0] <= device[1] <= device[2] <= outcome.peak_memory_bytes < GIB
    assert set(seen[-1][1].metrics()) == {"peak_memory_gib", "peak_rss_gib"}
