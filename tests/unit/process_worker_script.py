"""A worker process for the ProcessRunner tests: fluxlora.jobs.worker's own main with a handler
picked by FLUXLORA_TEST_HANDLER (the runner passes the environment on), standing in for work that
succeeds, fails, crashes, is slow or will not stop."""

from __future__ import annotations

import os
import signal
import sys
import time

from fluxlora.jobs.context import JobInterrupted
from fluxlora.server.worker import main
from fluxlora_api.shared.errors import InvalidArgument, Unavailable
from fluxlora_api.v1 import preprocessing_pb2, training_pb2  # noqa: F401 - the worker unpacks TrainSpecs too

STEP_S = 0.05


def ok(ctx, spec):
    ctx.progress("working", 1, 2, "item")
    ctx.metrics(loss=0.25)
    ctx.warn("only a few images")
    ctx.add_artifact(ctx.store.put_bytes("datasets/d/manifest.json", b"{}"), "dataset-manifest")
    ctx.progress("working", 2, 2, "item")
    return preprocessing_pb2.PreprocessResult(dataset_id="ds-1", image_count=os.getpid())


def steps(ctx, spec):
    """spec.base_size steps, resumable like training: a checkpoint object when stopped."""
    key = f"runs/{ctx.job_id}/checkpoint"
    start = int(ctx.store.get_bytes(key)) if ctx.store.exists(key) else 0
    if start:
        ctx.metrics(resumed_from_step=start)
    for step in range(start + 1, spec.base_size + 1):
        if ctx.should_stop:
            ctx.add_artifact(ctx.store.put_bytes(key, str(step - 1).encode()), "checkpoint", step - 1)
            raise JobInterrupted(ctx.job_id)
        time.sleep(STEP_S)
        ctx.progress("stepping", step, spec.base_size, "step")
    return preprocessing_pb2.PreprocessResult(dataset_id="ds-steps", image_count=spec.base_size)


def deaf(ctx, spec):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx.progress("not listening", 1)
    deadline = time.monotonic() + 60  # never outlive a test run that was itself killed
    while time.monotonic() < deadline:
        time.sleep(STEP_S)
    raise JobInterrupted(ctx.job_id)


def bad_request(ctx, spec):
    raise InvalidArgument("spec.base_size: must be a multiple of 64 (got 500)")


def killed(ctx, spec):
    ctx.progress("allocating", 1)
    os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does


def loading(ctx, spec):
    """Stands for loading a base model: one long call that never looks at should_stop."""
    ctx.progress("loading base model", 0)
    with ctx.interruptible():
        time.sleep(60)  # never outlive a test run that was itself killed
    return preprocessing_pb2.PreprocessResult(dataset_id="ds-loaded")


def segfault(ctx, spec):
    os.kill(os.getpid(), signal.SIGSEGV)


def exits(ctx, spec):
    os._exit(7)


def ranks(ctx, spec):
    """One rank of a torchrun job (TrainSpec.gpus): rank 0 reports; FLUXLORA_TEST_FAILING_RANK exits 7
    after a moment, as a rank that dies would."""
    rank = os.environ["RANK"]
    ctx.progress("ranks", 1, 2, "step")
    ctx.metrics(**{f"rank{rank}_pid": os.getpid()})
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if rank == os.environ.get("FLUXLORA_TEST_FAILING_RANK"):
            os._exit(7)
        if ctx.should_stop:
            raise JobInterrupted(ctx.job_id)
        time.sleep(STEP_S)
    return training_pb2.TrainResult(run_id=ctx.job_id, steps_done=int(os.environ["WORLD_SIZE"]))


def resumable_ranks(ctx, spec):
    """One rank of a torchrun job of spec.max_steps steps that resumes like training: rank 0 stores the
    step done as a checkpoint; each rank stores its pid (runs/<job>/rank<r>.pid) for a test to kill."""
    rank = int(os.environ["RANK"])
    key = f"runs/{ctx.job_id}/checkpoint"
    start = int(ctx.store.get_bytes(key)) if ctx.store.exists(key) else 0
    if start and rank == 0:
        ctx.metrics(resumed_from_step=start)
    ctx.store.put_bytes(f"runs/{ctx.job_id}/rank{rank}.pid", str(os.getpid()).encode())
    for step in range(start + 1, spec.max_steps + 1):
        if ctx.should_stop:
            raise JobInterrupted(ctx.job_id)
        time.sleep(STEP_S)
        if rank == 0:
            ctx.store.put_bytes(key, str(step).encode())
        ctx.progress("stepping", step, spec.max_steps, "step")
    return training_pb2.TrainResult(run_id=ctx.job_id, steps_done=spec.max_steps)


def gloo_ranks(ctx, spec):
    """One rank of a torchrun job joined in a gloo group; FLUXLORA_TEST_BAD_RANK finds the request wrong
    (a config error, exit 3) after the first all-reduce, while the others wait in the second."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        dist.all_reduce(torch.ones(1))
        if os.environ["RANK"] == os.environ.get("FLUXLORA_TEST_BAD_RANK"):
            bad_request(ctx, spec)
        dist.all_reduce(torch.ones(1))
    finally:
        dist.destroy_process_group()
    return training_pb2.TrainResult(run_id=ctx.job_id, steps_done=int(os.environ["WORLD_SIZE"]))


HANDLERS = {f.__name__: f for f in (ok, steps, deaf, bad_request, killed, segfault, exits, loading, ranks,
                                    resumable_ranks, gloo_ranks)}

def store_unreachable_at_start() -> None:
    """While the file FLUXLORA_TEST_STORE_DOWN names holds a number above 0, this worker finds the store
    unreachable when it opens it (as in an outage or with the bucket lost), and counts it down."""
    counter = os.environ.get("FLUXLORA_TEST_STORE_DOWN")
    if not counter or int(open(counter).read()) <= 0:
        return
    left = int(open(counter).read())
    with open(counter, "w") as f:
        f.write(str(left - 1))

    def unreachable(settings):
        raise Unavailable("object store s3://bucket at 127.0.0.1:9 unreachable while reading 'jobs/...': "
                          "connection refused")

    import fluxlora.common.storage

    fluxlora.common.storage.open_store = unreachable


if __name__ == "__main__":
    store_unreachable_at_start()
    sys.exit(main(handler=HANDLERS[os.environ["FLUXLORA_TEST_HANDLER"]]))
