"""TrainSpec.gpus and .nodes at submit: bounds, and whether this server's runner can start the
processes (training/parallelism.py); the trainer's config leaves them to the launcher."""

from __future__ import annotations

import pytest
import torch

from fluxlora.common.config import Settings
from fluxlora.common.limits import check_numbers
from fluxlora.training.job import config_from_spec
from fluxlora.training.parallelism import check_parallelism
from fluxlora.training.servicer import bounds
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument
from fluxlora_api.v1 import training_pb2 as pb


def settings(tmp_path, **overrides) -> Settings:
    return Settings(**({"store": str(tmp_path / "store"), "cache_dir": tmp_path / "cache"} | overrides))


@pytest.mark.parametrize(("runner", "device"), [("process", "cpu"), ("process", "auto"), ("kubernetes", "auto")])
def test_several_gpus_are_accepted_where_the_runner_starts_processes(tmp_path, runner, device):
    check_parallelism(pb.TrainSpec(gpus=8), settings(tmp_path, runner=runner, device=device))
    check_parallelism(pb.TrainSpec(gpus=1, nodes=1), settings(tmp_path))


def test_several_nodes_are_accepted_on_kubernetes(tmp_path):
    check_parallelism(pb.TrainSpec(gpus=4, nodes=2), settings(tmp_path, runner="kubernetes"))
    check_parallelism(pb.TrainSpec(gpus=1, nodes=16), settings(tmp_path, runner="kubernetes"))


@pytest.mark.parametrize(("spec", "runner", "words"), [
    (pb.TrainSpec(gpus=2), "local", ["spec.gpus is 2", "FLUXLORA_RUNNER=process"]),
    (pb.TrainSpec(nodes=2), "process", ["spec.nodes is 2", "needs FLUXLORA_RUNNER=kubernetes"]),
])
def test_what_the_runner_cannot_start_is_refused_naming_the_fix(tmp_path, spec, runner, words):
    with pytest.raises(FailedPrecondition) as refused:
        check_parallelism(spec, settings(tmp_path, runner=runner))
    assert all(w in str(refused.value) for w in words), refused.value


def test_the_process_runner_refuses_more_gpus_than_the_machine_has(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_parallelism(pb.TrainSpec(gpus=2), settings(tmp_path, runner="process"))
    with pytest.raises(FailedPrecondition, match="has 2 CUDA GPU"):
        check_parallelism(pb.TrainSpec(gpus=4), settings(tmp_path, runner="process"))
    check_parallelism(pb.TrainSpec(gpus=4), settings(tmp_path, runner="process", device="cpu"))  # CPU ranks


@pytest.mark.parametrize(("field", "value"), [("gpus", 9), ("gpus", -1), ("nodes", 17)])
def test_gpus_and_nodes_are_bounded(tmp_path, field, value):
    with pytest.raises(InvalidArgument, match=f"spec.{field}"):
        check_numbers(pb.TrainSpec(**{field: value}), bounds(settings(tmp_path)))


def test_the_trainer_config_leaves_gpus_and_nodes_to_the_launcher():
    cfg = config_from_spec(pb.TrainSpec(gpus=2, nodes=1, batch_size=3))
    assert cfg.batch_size == 3 and "gpus" not in cfg.model_dump()  # batch_size stays per process
