"""One rank of a data-parallel test run, started by torchrun from tests/unit/test_data_parallel.py:
train_lora on the CPU (gloo); rank 0 writes the outcome to <out>/outcome.json.

    torchrun --standalone --nproc-per-node 2 data_parallel_script.py MODEL DATASET OUT CONFIG_JSON
        [--resume-from DIR] [--stop-after STEPS]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from fluxlora.training.trainer import TrainCallbacks, TrainConfig, train_lora


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "dataset", "out", "config"):
        parser.add_argument(name)
    parser.add_argument("--resume-from", type=Path)
    parser.add_argument("--stop-after", type=int, help="rank 0 alone asks to stop after this many steps")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    steps: list[int] = []
    callbacks = TrainCallbacks(
        on_step=lambda step, *_: steps.append(step),
        should_stop=lambda: args.stop_after is not None and len(steps) >= args.stop_after,
    )
    outcome = train_lora(TrainConfig(**json.loads(args.config)), Path(args.model), Path(args.dataset),
                         Path(args.out), callbacks, resume_from=args.resume_from, device="cpu")
    if int(os.environ["RANK"]) == 0:
        (Path(args.out) / "outcome.json").write_text(json.dumps({
            "steps_done": outcome.steps_done, "losses": outcome.losses, "stopped": outcome.stopped,
            "checkpoints": [[step, str(path)] for step, path in outcome.checkpoints], "heard_steps": steps,
        }))
    else:  # a follower reports nothing and writes nothing
        assert steps == [] and outcome.checkpoints == [] and outcome.samples == [], outcome


if __name__ == "__main__":
    main()
