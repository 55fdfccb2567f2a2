"""The evaluation service's job handler: a GridSpec runs a grid job, a GenerateSpec a generate job."""

from __future__ import annotations

from google.protobuf.message import Message

from fluxlora.evaluation.generate_job import run_generate
from fluxlora.evaluation.grid_job import run_grid
from fluxlora.jobs.context import JobContext
from fluxlora_api.v1 import evaluation_pb2 as pb


def run_evaluation(ctx: JobContext, spec: Message) -> Message:
    if isinstance(spec, pb.GenerateSpec):
        return run_generate(ctx, spec)
    if isinstance(spec, pb.GridSpec):
        return run_grid(ctx, spec)
    raise TypeError(f"the evaluation service runs GridSpec and GenerateSpec jobs, not {type(spec).__name__}")


__all__ = ["run_evaluation", "run_generate", "run_grid"]
