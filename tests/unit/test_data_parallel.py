"""Data-parallel training (trainer/distributed.py): 2 processes on the CPU with gloo, started by
torchrun as the process runner and a Kubernetes pod start them, against one process at the same
global batch, and across an interruption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fluxlora.training.trainer import TrainConfig, train_lora
from fluxlora.training.trainer.distributed import DataParallel

SCRIPT = Path(__file__).with_name("data_parallel_script.py")
# Three images at batch 2: every other global batch is a bucket's short last one (one image), which
# leaves one rank an empty slice. caption_dropout and a cosine schedule put every random draw and
# the schedule's state into the comparison.
CONFIG = {"resolution": 64, "max_steps": 6, "learning_rate": 1e-3, "rank": 4, "alpha": 4, "checkpoint_every": 0,
          "sample_every": 0, "gradient_checkpointing": False, "seed": 0, "caption_dropout": 0.3,
          "lr_scheduler": "cosine"}


def torchrun(model: Path, dataset: Path, out: Path, *extra: str, processes: int = 2, **overrides) -> dict:
    """A run of `processes` ranks through torch's own launcher; rank 0's outcome."""
    config = json.dumps({**CONFIG, **overrides})
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
         str(SCRIPT), str(model), str(dataset), str(out), config, *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "outcome.json").read_text())


@pytest.fixture(scope="module")
def dataset(make_dataset, shape_image) -> Path:
    return make_dataset({
        "red": (shape_image((64, 64), "red"), "a red circle"),
        "blue": (shape_image((64, 64), "blue", "rectangle"), "a blue square"),
        "green": (shape_image((64, 64), "green"), "a green circle"),
    })


@pytest.fixture(scope="module")
def two_by_one(tiny_flux_dir, dataset, tmp_path_factory) -> tuple[dict, Path]:
    """2 processes x batch 1, 6 steps, uninterrupted."""
    out = tmp_path_factory.mktemp("two-by-one")
    return torchrun(tiny_flux_dir, dataset, out, batch_size=1), out


def final_lora(out: Path, step: int = 6) -> dict[str, torch.Tensor]:
    return load_file(out / f"checkpoints/step-{step:06d}/pytorch_lora_weights.safetensors")


def test_two_processes_equal_one_process_at_the_same_global_batch(tiny_flux_dir, dataset, two_by_one, tmp_path):
    outcome, out = two_by_one
    one = train_lora(TrainConfig(**{**CONFIG, "batch_size": 2}), tiny_flux_dir, dataset, tmp_path, device="cpu")

    assert outcome["steps_done"] == 6 and outcome["heard_steps"] == [1, 2, 3, 4, 5, 6]
    assert outcome["losses"] == pytest.approx(one.losses, rel=1e-5)
    parallel, single = final_lora(out), load_file(one.final_checkpoint)
    assert parallel.keys() == single.keys()
    for key in single:  # the same sums in another order: equal to float rounding, not bit for bit
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(parallel[k], single[k] * 0) for k in single)  # it trained: B is not zero


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes_exactly(tiny_flux_dir, dataset, two_by_one, tmp_path):
    whole, whole_out = two_by_one
    # Rank 0 alone asks to stop: both ranks end at the same step, and rank 0 keeps a checkpoint.
    stopped = torchrun(tiny_flux_dir, dataset, tmp_path / "stopped", "--stop-after", "3", batch_size=1)
    assert stopped["stopped"] and stopped["steps_done"] == 3
    checkpoint = tmp_path / "stopped/checkpoints/step-000003"
    assert [c[0] for c in stopped["checkpoints"]] == [3] and Path(stopped["checkpoints"][0][1]) == checkpoint

    resumed = torchrun(tiny_flux_dir, dataset, tmp_path / "resumed", "--resume-from", str(checkpoint),
                       batch_size=1)
    assert resumed["steps_done"] == 6 and resumed["heard_steps"] == [4, 5, 6]
    assert resumed["losses"] == whole["losses"]
    a, b = final_lora(whole_out), final_lora(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_resumes_only_with_its_number_of_processes(tiny_flux_dir, dataset, two_by_one, tmp_path):
    _, out = two_by_one
    final = out / "checkpoints/step-000006"  # the final one: make it resumable by asking for more steps
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\) and this run has 1.*resume with 2 GPU"):
        train_lora(TrainConfig(**{**CONFIG, "max_steps": 8}), tiny_flux_dir, dataset, tmp_path, resume_from=final,
                   device="cpu")


@pytest.mark.parametrize(("size", "world", "slices"), [
    (2, 2, [(0, 1), (1, 2)]), (1, 2, [(0, 0), (0, 1)]), (5, 2, [(0, 2), (2, 5)]),
    (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
])
def test_each_rank_trains_a_disjoint_slice_covering_the_global_batch(size, world, slices):
    got = [DataParallel(rank, world).shard(size) for rank in range(world)]
    assert [(s.start, s.stop) for s in got] == slices
