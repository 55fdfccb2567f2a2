"""Jobs in child processes (FLUXLORA_RUNNER=process): the runtime over a ProcessRunner whose worker is
fluxlora.jobs.worker's main with test handlers (process_worker_script.py), on a real store.

Spec: the work runs in another process and its progress, metrics, warnings, artifacts and result
reach the job; whatever way the process dies fails only its job, with a status that says how, and the
next job runs; cancel is SIGTERM (then SIGKILL) and keeps what was stored; a shutdown re-queues the
job and the next start resumes it, after waiting for a leftover worker of a dead server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.jobs import process
from fluxlora.jobs.process import ProcessRunner, exit_status, is_worker_of, worker_env
from fluxlora.jobs.runners import LocalRunner, runner_for
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.jobs.worker import EXIT_INTERRUPTED, EXIT_UNAVAILABLE, load_report, run_worker
from fluxlora_api.shared.errors import NotFound, Unavailable
from fluxlora_api.v1 import jobs_pb2, preprocessing_pb2, training_pb2
from support import make_s3_store

S = jobs_pb2.JobState
SCRIPT = Path(__file__).with_name("process_worker_script.py")
PREFIXES = {"preprocessing": "pre", "training": "trn"}


def spec(steps: int = 2) -> preprocessing_pb2.PreprocessSpec:
    return preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=steps)


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def start(store, tmp_path, monkeypatch):
    """start(handler) -> a started runtime whose jobs run `handler` in worker processes; `store` is the
    one the server uses (the test's local store by default) and `settings` more of the server's settings."""
    runtimes = []

    def start(handler: str, stop_grace_s: float = 30.0, service: str = "preprocessing", store=store,
              **settings) -> JobRuntime:
        monkeypatch.setenv("FLUXLORA_TEST_HANDLER", handler)
        config = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache", runner="process", **settings)
        runner = ProcessRunner(config, service, command=[sys.executable, str(SCRIPT)], stop_grace_s=stop_grace_s,
                               poll_s=0.05)
        runtime = JobRuntime(service, PREFIXES[service], store, handler=None, settings=config, runner=runner)
        runtime.start()
        runtimes.append(runtime)
        return runtime

    yield start
    for runtime in runtimes:
        runtime.shutdown()


def finish(runtime: JobRuntime, job_id: str) -> tuple[jobs_pb2.Job, list[jobs_pb2.JobEvent]]:
    events = list(runtime.watch(job_id))
    return events[-1].job, events


def wait_for(runtime: JobRuntime, job_id: str, done: int) -> jobs_pb2.Job:
    for event in runtime.watch(job_id):
        if event.job.progress.done >= done:
            return event.job
    raise AssertionError(f"job {job_id} ended before step {done}")


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/cmdline").read_bytes() != b""


def test_a_job_runs_in_a_worker_process_and_everything_it_reports_reaches_the_job(start):
    runtime = start("ok")
    job, events = finish(runtime, runtime.submit(spec()).job_id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    result = preprocessing_pb2.PreprocessResult()
    job.result.Unpack(result)
    assert result.dataset_id == "ds-1"
    assert result.image_count == job.metrics["worker_pid"] != os.getpid()  # the worker's pid
    assert job.metrics["loss"] == 0.25 and list(job.warnings) == ["only a few images"]
    assert [a.key for a in job.artifacts] == ["datasets/d/manifest.json"]
    assert (job.progress.done, job.progress.total) == (2, 2)
    assert any(e.message.startswith("started worker process ") for e in events)


def test_a_worker_reaches_an_s3_store_with_the_servers_s3_settings(start, moto_endpoint):
    store = make_s3_store(moto_endpoint)
    runtime = start("ok", store=store, s3_endpoint=moto_endpoint, s3_access_key="test", s3_secret_key="test")
    job, _ = finish(runtime, runtime.submit(spec()).job_id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert store.get_bytes("datasets/d/manifest.json") == b"{}"


@pytest.mark.parametrize("handler, code, words", [
    ("killed", "RESOURCE_EXHAUSTED", ["SIGKILL (signal 9)", "out-of-memory killer"]),
    ("segfault", "INTERNAL", ["SIGSEGV", "segmentation fault"]),
    ("exits", "INTERNAL", ["exited with code 7"]),
    ("bad_request", "INVALID_ARGUMENT", ["spec.base_size: must be a multiple of 64"]),
])
def test_a_worker_that_dies_fails_only_its_job_with_a_status_saying_how(start, store, monkeypatch, handler, code,
                                                                        words):
    runtime = start(handler)
    job, _ = finish(runtime, runtime.submit(spec()).job_id)
    assert job.state == S.JOB_STATE_FAILED
    assert job.error.code == code and all(w in job.error.message for w in words), job.error
    assert not alive(int(job.metrics["worker_pid"]))
    assert store.get_json(f"jobs/preprocessing/{job.job_id}.json")["error"]["code"] == code

    monkeypatch.setenv("FLUXLORA_TEST_HANDLER", "ok")  # the next job's worker succeeds
    after, _ = finish(runtime, runtime.submit(spec()).job_id)
    assert after.state == S.JOB_STATE_SUCCEEDED


def test_cancel_stops_the_worker_at_its_next_step_and_keeps_what_it_stored(start, store):
    runtime = start("steps")
    job_id = runtime.submit(spec(steps=10_000)).job_id
    running = wait_for(runtime, job_id, done=3)
    runtime.cancel(job_id)
    job, events = finish(runtime, job_id)
    assert job.state == S.JOB_STATE_CANCELLED
    assert any("asked worker process" in e.message and "SIGTERM" in e.message for e in events)
    assert not alive(int(running.metrics["worker_pid"]))
    checkpoint = [a for a in job.artifacts if a.kind == "checkpoint"]
    assert checkpoint and int(store.get_bytes(checkpoint[0].key)) >= 3


def test_cancel_while_loading_a_model_takes_effect_within_seconds(start):
    runtime = start("loading", stop_grace_s=30.0)  # far longer than the cancel may take
    job_id = runtime.submit(spec()).job_id
    for event in runtime.watch(job_id):
        if event.job.progress.stage == "loading base model":
            break
    time.sleep(0.5)  # inside the long call
    asked = time.monotonic()
    runtime.cancel(job_id)
    job, _ = finish(runtime, job_id)
    assert job.state == S.JOB_STATE_CANCELLED
    assert time.monotonic() - asked < 5


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period(start):
    runtime = start("deaf", stop_grace_s=0.5)
    job_id = runtime.submit(spec()).job_id
    running = wait_for(runtime, job_id, done=1)
    runtime.cancel(job_id)
    job, _ = finish(runtime, job_id)
    assert job.state == S.JOB_STATE_CANCELLED
    assert not alive(int(running.metrics["worker_pid"]))


def test_a_shutdown_requeues_the_job_and_the_next_start_resumes_it(start, store):
    runtime = start("steps")
    job_id = runtime.submit(spec(steps=40)).job_id
    running = wait_for(runtime, job_id, done=3)
    runtime.shutdown()
    assert store.get_json(f"jobs/preprocessing/{job_id}.json")["state"] == "JOB_STATE_QUEUED"
    assert not alive(int(running.metrics["worker_pid"]))
    stopped_at = int(store.get_bytes(f"runs/{job_id}/checkpoint"))

    job, _ = finish(start("steps"), job_id)
    assert job.state == S.JOB_STATE_SUCCEEDED
    assert job.metrics["resumed_from_step"] == stopped_at >= 3


def messages(runtime: JobRuntime, job_id: str) -> list[str]:
    """Every event message the runtime still holds for the job (a watch only sends the ones after it starts)."""
    return [e.message for e in runtime._logs[job_id].events]


def test_the_next_start_waits_for_a_worker_left_by_a_dead_server(start, store, tmp_path):
    # A server that died left its worker running (it stops by itself, once at a safe point); the
    # worker's pid is on the job's record.
    job = JobRuntime("preprocessing", "pre", store, handler=None, runner=LocalRunner(None)).submit(spec())
    release = tmp_path / "release"
    leftover = subprocess.Popen([sys.executable, "-c", "import pathlib, sys, time\n"
                                 "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.02)",
                                 str(release), job.job_id])
    while not is_worker_of(leftover.pid, job.job_id):  # until it has exec'd (the fork has pytest's command line)
        assert leftover.poll() is None
    assert not is_worker_of(leftover.pid, "pre-other")
    record = store.get_json(f"jobs/preprocessing/{job.job_id}.json")
    store.put_json(f"jobs/preprocessing/{job.job_id}.json", record | {"metrics": {"worker_pid": leftover.pid}})

    runtime = start("ok")
    waiting = f"waiting for worker process {leftover.pid} of an earlier server to stop"
    for _event in runtime.watch(job.job_id):
        if waiting in messages(runtime, job.job_id):
            break
    assert not any(m.startswith("started worker process") for m in messages(runtime, job.job_id))
    release.touch()
    leftover.wait()
    final, _ = finish(runtime, job.job_id)
    assert final.state == S.JOB_STATE_SUCCEEDED and final.metrics["worker_pid"] != leftover.pid
    seen = messages(runtime, job.job_id)
    assert seen.index(waiting) < next(i for i, m in enumerate(seen) if m.startswith("started worker process"))


def test_a_worker_whose_server_is_gone_stops_at_its_next_step_and_keeps_its_checkpoint(store, tmp_path):
    """The server holds the worker's stdin; when the server dies the pipe closes (here: we close it)."""
    job = JobRuntime("preprocessing", "pre", store, handler=None, runner=LocalRunner(None)).submit(spec(steps=10_000))
    settings = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache")
    env = worker_env(settings, store) | {"FLUXLORA_TEST_HANDLER": "steps"}
    worker = subprocess.Popen([sys.executable, str(SCRIPT), "preprocessing", job.job_id, "--watch-parent"],
                              stdin=subprocess.PIPE, env=env)
    while (load_report(store, "preprocessing", job.job_id) or jobs_pb2.Job()).progress.done < 2:
        assert worker.poll() is None
    worker.stdin.close()
    assert worker.wait() == EXIT_INTERRUPTED
    assert int(store.get_bytes(f"runs/{job.job_id}/checkpoint")) >= 2


def test_the_worker_gets_the_servers_settings_and_store_but_no_credentials_to_serve(tmp_path, store, monkeypatch):
    monkeypatch.setenv("FLUXLORA_AUTH_TOKEN", "secret-token")
    settings = Settings(store="s3://elsewhere", cache_dir=tmp_path / "cache", gpu_memory_gib=None, workers=3,
                        s3_secret_key="s3-secret", k8s_node_selector={"gpu": "4090"}, tls_cert_file=tmp_path / "c")
    env = worker_env(settings, store)
    assert env["FLUXLORA_STORE"] == str(store.root)  # the store the server really uses
    assert "FLUXLORA_AUTH_TOKEN" not in env and "FLUXLORA_TLS_CERT_FILE" not in env
    assert "FLUXLORA_GPU_MEMORY_GIB" not in env and env["PATH"] == os.environ["PATH"]
    for key in [k for k in os.environ if k.startswith("FLUXLORA_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = Settings()
    assert seen.model_dump(exclude={"store", "auth_token", "tls_cert_file"}) == settings.model_dump(
        exclude={"store", "auth_token", "tls_cert_file"})
    assert seen.s3_secret_key.get_secret_value() == "s3-secret"


def test_runner_process_is_chosen_by_the_setting(tmp_path):
    runner = runner_for(Settings(store=str(tmp_path), runner="process", process_stop_grace_s=7), "training", None)
    assert isinstance(runner, ProcessRunner) and runner.stop_grace_s == 7
    assert runner.command[1:] == ["-m", "fluxlora.server.worker"]


@pytest.mark.parametrize("returncode, code, words", [
    (-signal.SIGKILL, "RESOURCE_EXHAUSTED", ["SIGKILL", "out-of-memory"]),
    (-signal.SIGABRT, "INTERNAL", ["SIGABRT", "abort"]),
    (-signal.SIGBUS, "INTERNAL", ["SIGBUS"]),
    (-signal.SIGHUP, "ABORTED", ["SIGHUP", "outside fluxlora"]),
    (75, "ABORTED", ["outside fluxlora"]),
    (139, "INTERNAL", ["exited with code 139"]),
])
def test_how_a_worker_ended_becomes_a_status(returncode, code, words):
    got_code, message = exit_status(returncode, 4242, "trn-0123456789ab")
    assert got_code == code and all(w in message for w in words)
    assert "pid 4242" in message and "trn-0123456789ab" in message


def test_a_job_on_two_gpus_runs_two_ranks_under_torchrun_and_rank_0_alone_reports(start):
    runtime = start("ranks", stop_grace_s=10, service="training")
    job, _ = finish(runtime, runtime.submit(training_pb2.TrainSpec(dataset_id="ds-1", gpus=2)).job_id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    result = training_pb2.TrainResult()
    assert job.result.Unpack(result) and result.steps_done == 2  # rank 0 saw WORLD_SIZE=2
    assert "rank0_pid" in job.metrics and "rank1_pid" not in job.metrics  # the follower's report stays unstored
    assert job.metrics["worker_pid"] not in (job.metrics["rank0_pid"], os.getpid())  # torchrun's pid


def test_a_failed_rank_fails_the_job_naming_torchrun_and_where_to_look(start, monkeypatch):
    monkeypatch.setenv("FLUXLORA_TEST_FAILING_RANK", "1")
    runtime = start("ranks", stop_grace_s=10, service="training")
    job, _ = finish(runtime, runtime.submit(training_pb2.TrainSpec(dataset_id="ds-1", gpus=2)).job_id)
    assert job.state == S.JOB_STATE_FAILED and job.error.code == "INTERNAL", job.error
    assert all(w in job.error.message for w in ("a rank of job", "torchrun", "2 worker processes",
                                                 "resume_from_run")), job.error.message


def test_a_config_error_in_one_rank_fails_the_job_at_once_saying_so(start, monkeypatch):
    monkeypatch.setenv("FLUXLORA_TEST_BAD_RANK", "1")
    runtime = start("gloo_ranks", stop_grace_s=10, service="training")
    job, _ = finish(runtime, runtime.submit(training_pb2.TrainSpec(dataset_id="ds-1", gpus=2)).job_id)
    assert job.state == S.JOB_STATE_FAILED and job.attempts == 1, job
    # Not rank 0's echo of it (gloo: "Connection closed by peer"), which rank 0 stored as its error.
    assert job.error.code == "FAILED_PRECONDITION", job.error
    assert all(w in job.error.message for w in ("exit 3", "config error", "server log", "rank 0 failed after it")), \
        job.error.message


def kill_rank_1(runtime: JobRuntime, store: LocalStore, job_id: str, after_step: int, killed: set[int]) -> None:
    """SIGKILL to rank 1 of the job's current attempt once it is past `after_step` (what the kernel's
    out-of-memory killer does to the process of one GPU)."""
    key = f"runs/{job_id}/rank1.pid"
    for event in runtime.watch(job_id):
        pid = int(store.get_bytes(key)) if store.exists(key) else 0
        if pid and pid not in killed and event.job.progress.done > after_step:
            killed.add(pid)
            os.kill(pid, signal.SIGKILL)
            return
    raise AssertionError(f"job {job_id} ended before rank 1 could be killed")


def test_a_rank_killed_by_the_oom_killer_runs_the_job_again_from_its_last_checkpoint(start, store):
    """FLUXLORA_MAX_JOB_ATTEMPTS (default 2) starts: the second resumes and finishes."""
    runtime = start("resumable_ranks", stop_grace_s=10, service="training")
    job_id = runtime.submit(training_pb2.TrainSpec(dataset_id="ds-1", gpus=2, max_steps=60)).job_id
    kill_rank_1(runtime, store, job_id, 3, set())
    job, events = finish(runtime, job_id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert job.attempts == 2 and job.metrics["resumed_from_step"] >= 3
    retried = next(e.message for e in events if "running it again" in e.message)
    assert all(w in retried for w in ("a rank of job", "SIGKILL", "out-of-memory killer", "attempt 2 of 2")), retried


def test_a_rank_killed_in_every_attempt_fails_the_job_as_out_of_memory(start, store):
    runtime = start("resumable_ranks", stop_grace_s=10, service="training")
    job_id = runtime.submit(training_pb2.TrainSpec(dataset_id="ds-1", gpus=2, max_steps=200)).job_id
    killed: set[int] = set()
    kill_rank_1(runtime, store, job_id, 1, killed)
    kill_rank_1(runtime, store, job_id, 1, killed)
    job, _ = finish(runtime, job_id)
    assert job.state == S.JOB_STATE_FAILED and job.error.code == "RESOURCE_EXHAUSTED", job.error
    assert all(w in job.error.message for w in ("SIGKILL", "FLUXLORA_MAX_JOB_ATTEMPTS=2", "kept")), job.error.message


class ReportLostForAWhile(LocalStore):
    """The server's view of the store: for LOST_S after a worker's report first reads as SUCCEEDED, it
    reads as missing, as S3 answers NoSuchBucket while a bucket is lost and not yet restored."""

    LOST_S = 2.0
    lost_since: float | None = None

    def get_bytes(self, key: str) -> bytes:
        data = super().get_bytes(key)
        if key.startswith("jobs/workers/") and b"JOB_STATE_SUCCEEDED" in data:
            self.lost_since = self.lost_since or time.monotonic()
            if time.monotonic() - self.lost_since < self.LOST_S:
                raise NotFound(f"object {key!r} not found (NoSuchBucket)")
        return data


def test_a_worker_that_exited_0_is_not_failed_while_its_report_reads_as_missing(start, tmp_path):
    """Found by the chaos run: a lost bucket right as a training worker finished failed its job INTERNAL
    ("exited 0 but stored no result") although the result was stored."""
    store = ReportLostForAWhile(tmp_path / "lost")
    runtime = start("ok", store=store)
    job, _ = finish(runtime, runtime.submit(spec()).job_id)
    assert store.lost_since is not None
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert job.result.Is(preprocessing_pb2.PreprocessResult.DESCRIPTOR)


def test_a_worker_that_cannot_reach_the_store_to_start_is_started_again_once_it_can(
        start, tmp_path, monkeypatch):
    """Found by the 30-minute chaos run: a worker started during an outage or a lost bucket exited 1 with a
    traceback and its job failed INTERNAL. Nothing ran, so it is started again while the store is out."""
    monkeypatch.setattr(process, "STORE_RETRY_S", 0.1)
    counter = tmp_path / "down"
    counter.write_text("2")
    monkeypatch.setenv("FLUXLORA_TEST_STORE_DOWN", str(counter))
    runtime = start("ok")
    job, events = finish(runtime, runtime.submit(spec()).job_id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert counter.read_text() == "0"
    said = [e.message for e in events if "could not reach the store" in e.message]
    assert len(said) == 2 and "starting it again" in said[0]


def test_a_store_out_for_longer_than_the_wait_fails_the_job_unavailable_not_internal(start, tmp_path, monkeypatch):
    monkeypatch.setattr(process, "STORE_RETRY_S", 0.1)
    monkeypatch.setattr(process, "STORE_WAIT_S", 0.5)
    counter = tmp_path / "down"
    counter.write_text("1000")
    monkeypatch.setenv("FLUXLORA_TEST_STORE_DOWN", str(counter))
    runtime = start("ok")
    job, _ = finish(runtime, runtime.submit(spec()).job_id)
    assert job.state == S.JOB_STATE_FAILED
    assert job.error.code == "UNAVAILABLE"
    assert "could not reach the store" in job.error.message
    assert "resubmit once the store is reachable" in job.error.message


class ReportsRefused(LocalStore):
    """Writes of worker reports fail as while a bucket is lost, once `lost` is set."""

    lost = False

    def put_file(self, key, path, content_type="application/octet-stream"):
        if self.lost and key.startswith("jobs/workers/"):
            raise Unavailable(f"bucket 'b' does not exist (NoSuchBucket) while accessing {key!r}")
        return super().put_file(key, path, content_type)


def test_a_worker_whose_end_cannot_be_stored_exits_for_a_restart_not_as_a_crash(tmp_path):
    """Found by the 30-minute chaos run (after the fix above): the bucket lost while a worker stored its
    end made it exit 1 with a traceback, and its job failed INTERNAL."""
    store = ReportsRefused(tmp_path / "store")
    runtime = JobRuntime("preprocessing", "pre", store, handler=None, settings=Settings(store=str(tmp_path)))
    job = runtime.submit(spec())  # stored, never started: the worker runs it

    def handler(ctx, spec):
        store.lost = True
        return preprocessing_pb2.PreprocessResult(dataset_id="ds-1")

    assert run_worker("preprocessing", job.job_id, runtime.settings, store, handler=handler) == EXIT_UNAVAILABLE

