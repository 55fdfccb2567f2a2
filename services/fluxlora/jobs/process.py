"""Jobs in child processes (FLUXLORA_RUNNER=process): the server keeps its queue, records and
watchers; each job's work runs in its own `python -m fluxlora.server.worker <service> <job_id>`
(fluxlora.jobs.worker: the handler the server would run), on the same store and settings. Whatever
kills the work (the kernel's out-of-memory killer, a segfault in native code, a CUDA error that
aborts the process) ends that job as FAILED; the server stays SERVING and runs the next job in a new
process, with all the memory the dead one held given back.

- Progress, metrics, artifacts and warnings: the worker writes its report
  (jobs/workers/<service>/<job_id>.json) about once a second, and the runner copies it into the job's
  record as often (REPORT_POLL_S; fluxlora.jobs.reports), so WatchJob streams as with threads. The
  record's metric `worker_pid` says which process runs the job.
- Cancel and shutdown: SIGTERM to the child, which stops at its next safe point (training: before
  the next step, after saving a checkpoint of the steps done) and exits EXIT_INTERRUPTED; SIGKILL
  after FLUXLORA_PROCESS_STOP_GRACE_S. A cancelled job ends CANCELLED, one stopped by a shutdown is
  QUEUED again and its next attempt resumes (training: from its last stored checkpoint).
- A dead server: the child's stdin is a pipe from the server that nobody writes to. When the server
  dies without stopping the child (SIGKILL, a crash), the pipe closes and the child stops as on
  SIGTERM. The next start re-queues the job, and its new child waits for such a leftover to exit
  first, so two processes never work on one run; a leftover that finished the job meanwhile gives
  its result and nothing runs again.
- Several GPUs (TrainSpec.gpus > 1): the child is torchrun (`python -m fluxlora.server.launcher`,
  fluxlora.jobs.launch), which starts one worker per GPU; rank 0 writes the report. SIGTERM reaches
  every rank through torchrun; when one rank fails, torchrun stops the others and the launcher exits
  with that rank's code. A rank killed by a signal (137: the out-of-memory killer's SIGKILL on one
  GPU's process) is a dead worker like a single one killed: the job runs again from its last
  checkpoint until it has been started FLUXLORA_MAX_JOB_ATTEMPTS times (default 2).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from google.protobuf.message import Message
from pydantic import SecretStr

from fluxlora.common.config import Settings
from fluxlora.jobs.context import JobInterrupted
from fluxlora.jobs.launch import LAUNCHER_MODULE, gpus_of, torchrun_options
from fluxlora.jobs.reports import (
    FINISHED,
    RemoteJobFailed,
    ReportMirror,
    WorkerDied,
    after_a_rank_refused,
    finished_outcome,
    rank_refused,
)
from fluxlora.jobs.worker import (
    EXIT_INTERRUPTED,
    EXIT_PERMANENT,
    EXIT_SUCCEEDED,
    EXIT_UNAVAILABLE,
    load_report,
)
from fluxlora_api.shared.errors import Unavailable
from fluxlora_api.v1 import jobs_pb2

if TYPE_CHECKING:
    from fluxlora.common.storage import ArtifactStore
    from fluxlora.jobs.runtime import JobRuntime

log = logging.getLogger(__name__)

WORKER_MODULE = "fluxlora.server.worker"
REPORT_POLL_S = 1.0  # the worker writes its report about as often (worker.PERSIST_INTERVAL_S)
STOP_CHECK_S = 0.1  # how soon a cancel or shutdown reaches the child
UNASKED_STOP_WAIT_S = 2.0  # a child stopped by someone else's SIGTERM: time for our own shutdown to show
# A worker that could not reach the store to read its job or store its end (EXIT_UNAVAILABLE) is started again
# every STORE_RETRY_S for STORE_WAIT_S, as the store's own retries wait out an outage, before the job
# fails UNAVAILABLE.
STORE_RETRY_S = 5.0
STORE_WAIT_S = 120.0
EXITED_0_READ_S = 60.0  # how long the report of a worker that exited 0 is read again while it reads as unfinished
PID_METRIC = "worker_pid"
# The worker serves no RPCs: it gets neither the token nor TLS keys.
_SERVER_ONLY_PREFIXES = ("auth_", "tls_")
_CRASH_SIGNALS = {
    signal.SIGSEGV: "a segmentation fault",
    signal.SIGBUS: "a bus error",
    signal.SIGILL: "an illegal instruction",
    signal.SIGFPE: "a floating-point exception",
    signal.SIGABRT: "an abort (a fatal error in native code, e.g. an unhandled C++ exception or a CUDA error)",
}
_KILLING_SIGNALS = frozenset({signal.SIGKILL, *_CRASH_SIGNALS})  # a worker killed by these runs again


class _StoreUnreachable(Exception):
    """The worker exited EXIT_UNAVAILABLE: it could not read its job, or store its end, so no outcome is known."""


class ProcessRunner:
    def __init__(self, settings: Settings, service: str, command: list[str] | None = None,
                 stop_grace_s: float | None = None, poll_s: float = REPORT_POLL_S):
        self.settings = settings
        self.service = service
        # The worker's command line before `<service> <job_id>`; tests put a script with their own handlers here.
        self.command = list(command or [sys.executable, "-m", WORKER_MODULE])
        self.stop_grace_s = stop_grace_s if stop_grace_s is not None else settings.process_stop_grace_s
        self.poll_s = poll_s

    @classmethod
    def from_settings(cls, settings: Settings, service: str) -> ProcessRunner:
        return cls(settings, service)

    # --- the Runner protocol ------------------------------------------------------------------
    def run(self, runtime: JobRuntime, job_id: str, spec: Any, scratch: Path) -> Message:
        deadline = time.monotonic() + STORE_WAIT_S
        while True:
            try:
                return self._run_once(runtime, job_id, spec)
            except _StoreUnreachable as exc:
                if time.monotonic() > deadline:
                    raise RemoteJobFailed("UNAVAILABLE", f"{exc}; it was started again for {STORE_WAIT_S:.0f} s: "
                                                         "resubmit once the store is reachable") from exc
                runtime.update(job_id, lambda job: None,
                               message=f"{exc}; starting it again in {STORE_RETRY_S:.0f} s")
                end = time.monotonic() + STORE_RETRY_S
                while time.monotonic() < end:
                    if runtime.should_stop(job_id):
                        raise JobInterrupted(job_id) from exc
                    time.sleep(STOP_CHECK_S)

    def _run_once(self, runtime: JobRuntime, job_id: str, spec: Any) -> Message:
        self._wait_for_leftover(runtime, job_id)
        earlier = self._report(runtime, job_id)
        if earlier is not None and earlier.state in FINISHED:
            # Finished (in an earlier process) before the server could record it: never run it twice.
            runtime.update(job_id, lambda job: None, message="finished by an earlier worker process")
            return finished_outcome(earlier) or _no_result(job_id, 0, None)
        if runtime.should_stop(job_id):
            raise JobInterrupted(job_id)

        processes = gpus_of(spec)
        child = subprocess.Popen(
            self._command(job_id, processes),
            # torchrun's workers inherit the pipe too: each of them watches for the server's end.
            stdin=subprocess.PIPE, env=worker_env(self.settings, runtime.store),
            # Its own session: a Ctrl-C in the server's terminal reaches the server, which stops the
            # child itself (and records the job as interrupted), rather than both at once.
            start_new_session=True,
        )
        pid = child.pid
        how = f"torchrun with {processes} worker processes" if processes > 1 else "worker process"
        runtime.update(job_id, lambda job: job.metrics.__setitem__(PID_METRIC, pid),
                       message=f"started {how} {pid}: {WORKER_MODULE} {self.service} {job_id}")
        mirror = ReportMirror(runtime, self.service, job_id, seen=earlier, extra_metrics={PID_METRIC: pid})
        try:
            returncode, asked_to_stop = self._supervise(runtime, job_id, child, mirror)
        finally:
            if child.poll() is None:  # only when this thread itself failed: never leave the child behind
                child.kill()
                child.wait()
            if child.stdin:
                child.stdin.close()
        report = self._final_report(runtime, job_id, mirror)
        if returncode == EXIT_SUCCEEDED and (report is None or report.state not in FINISHED):
            report = self._read_again(runtime, job_id, mirror)
        return self._outcome(runtime, job_id, pid, returncode, report, asked_to_stop, processes)

    def recover(self, runtime: JobRuntime) -> None:
        """Nothing to adopt: a leftover child of a dead server stops by itself (its stdin closed),
        and the job's next attempt waits for it (run)."""

    # --- internals ----------------------------------------------------------------------------
    def _command(self, job_id: str, processes: int) -> list[str]:
        """The worker's command line; for several GPUs, under torchrun through our launcher (self.command
        starts with the interpreter: torchrun runs the rest, a module after -m or a script, once per rank)."""
        command = [*self.command, self.service, job_id, "--watch-parent"]
        if processes == 1:
            return command
        return [command[0], "-m", LAUNCHER_MODULE, *torchrun_options(processes, self.stop_grace_s), *command[1:]]

    def _supervise(self, runtime: JobRuntime, job_id: str, child: subprocess.Popen,
                   mirror: ReportMirror) -> tuple[int, bool]:
        """Mirrors the report until the child exits; passes cancel and shutdown on as SIGTERM, then
        SIGKILL after the grace period. Returns (exit status, whether we asked it to stop)."""
        asked_at: float | None = None
        killed = False
        next_read = 0.0
        while True:
            try:
                returncode = child.wait(timeout=STOP_CHECK_S)
            except subprocess.TimeoutExpired:
                returncode = None
            now = time.monotonic()
            if returncode is not None:
                return returncode, asked_at is not None
            if now >= next_read:
                next_read = now + self.poll_s
                try:
                    mirror.refresh()
                except Unavailable as exc:  # the store restarting must not fail a run that is fine
                    log.warning("could not read the worker report of %s: %s", job_id, exc)
            if asked_at is None and runtime.should_stop(job_id):
                asked_at = now
                why = "cancel requested" if runtime.get(job_id).cancel_requested else "server shutting down"
                child.send_signal(signal.SIGTERM)
                runtime.update(job_id, lambda job: None, persist=False,
                               message=f"{why}: asked worker process {child.pid} to stop (SIGTERM)")
            elif asked_at is not None and not killed and now - asked_at > self.stop_grace_s:
                killed = True
                log.warning("worker process %d of %s did not stop within %.0f s of SIGTERM; killing it",
                            child.pid, job_id, self.stop_grace_s)
                child.kill()

    def _report(self, runtime: JobRuntime, job_id: str) -> jobs_pb2.Job | None:
        return self._patiently(runtime, job_id, lambda: load_report(runtime.store, self.service, job_id))

    def _final_report(self, runtime: JobRuntime, job_id: str, mirror: ReportMirror) -> jobs_pb2.Job | None:
        return self._patiently(runtime, job_id, mirror.refresh)

    def _patiently(self, runtime: JobRuntime, job_id: str, read: Callable[[], jobs_pb2.Job | None]):
        """read(), waiting out a store that is unreachable for a while (JobInterrupted when the server
        stops meanwhile: the next start reads again, and takes a result the worker stored)."""
        while True:
            try:
                return read()
            except Unavailable as exc:
                log.warning("could not read the worker report of %s: %s", job_id, exc)
                if runtime.stopping:
                    raise JobInterrupted(job_id) from exc
                time.sleep(self.poll_s)

    def _read_again(self, runtime: JobRuntime, job_id: str, mirror: ReportMirror) -> jobs_pb2.Job | None:
        """A worker exits 0 only once its report holds its result: one that reads as missing or unfinished
        then is a store answering wrongly for a while (a lost bucket's NoSuchBucket reads as a missing
        object), so it is read again for up to EXITED_0_READ_S before the job fails for want of a result."""
        log.warning("the worker of %s exited 0 but its report reads as unfinished; reading it again", job_id)
        deadline = time.monotonic() + EXITED_0_READ_S
        while True:
            if runtime.stopping:
                raise JobInterrupted(job_id)  # the next start reads the report again, and takes its result
            time.sleep(self.poll_s)
            report = self._final_report(runtime, job_id, mirror)
            if (report is not None and report.state in FINISHED) or time.monotonic() > deadline:
                return report

    def _outcome(self, runtime: JobRuntime, job_id: str, pid: int, returncode: int,
                 report: jobs_pb2.Job | None, asked_to_stop: bool, processes: int = 1) -> Message:
        if processes > 1 and returncode == EXIT_PERMANENT and after_a_rank_refused(report):
            raise rank_refused(f"job {job_id} (torchrun pid {pid}, {processes} worker processes)", report,
                               "the server log (logger names end in -worker)")
        if report is not None and report.state in FINISHED:
            # What the worker stored wins, whatever happened after: its result, or its own error.
            return finished_outcome(report) or _no_result(job_id, pid, returncode)
        if asked_to_stop:
            raise JobInterrupted(job_id)
        if returncode == EXIT_UNAVAILABLE:
            raise _StoreUnreachable(f"the worker process (pid {pid}) of job {job_id} could not reach the store "
                                    f"{runtime.store.uri} to read its job or to store its end (its log line says why)")
        if returncode in (EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGINT):
            # Stopped by a signal we did not send: part of this machine shutting down (and this server
            # with it, which then re-queues the job), or someone's `kill`.
            deadline = time.monotonic() + UNASKED_STOP_WAIT_S
            while time.monotonic() < deadline:
                if runtime.should_stop(job_id):
                    raise JobInterrupted(job_id)
                time.sleep(STOP_CHECK_S)
        if processes > 1 and returncode - 128 in _KILLING_SIGNALS:
            # The launcher exits 128 + the signal that killed a rank: a dead worker, run again as a single one.
            code, message = exit_status(128 - returncode, pid, job_id, process=(
                f"a rank of job {job_id} (one of {processes} worker processes under torchrun, pid {pid})"))
            raise WorkerDied(code, message)
        if processes > 1 and returncode > 0 and returncode != EXIT_INTERRUPTED:
            own = f"; rank 0's own error: {report.error.message}" if report is not None and report.error.code else ""
            raise RemoteJobFailed("INTERNAL", ranks_failed(pid, job_id, processes, returncode) + own)
        code, message = exit_status(returncode, pid, job_id)
        if -returncode in _KILLING_SIGNALS:
            raise WorkerDied(code, message)  # the runtime runs it again, up to FLUXLORA_MAX_JOB_ATTEMPTS
        raise RemoteJobFailed(code, message)

    def _wait_for_leftover(self, runtime: JobRuntime, job_id: str) -> None:
        """Waits until a worker process an earlier server started for this job has exited (it stops
        by itself once its server is gone); passes cancel and shutdown on to it."""
        pid = int(runtime.get(job_id).metrics.get(PID_METRIC, 0))
        if not pid or not is_worker_of(pid, job_id):
            return
        runtime.update(job_id, lambda job: None,
                       message=f"waiting for worker process {pid} of an earlier server to stop")
        asked_at: float | None = None
        while is_worker_of(pid, job_id):
            if runtime.stopping:
                _signal(pid, signal.SIGTERM)
                raise JobInterrupted(job_id)  # the next start waits for it again
            if runtime.should_stop(job_id):  # cancelled: stop it as our own child would be
                if asked_at is None:
                    asked_at = time.monotonic()
                    _signal(pid, signal.SIGTERM)
                elif time.monotonic() - asked_at > self.stop_grace_s:
                    _signal(pid, signal.SIGKILL)
            time.sleep(STOP_CHECK_S)


def exit_status(returncode: int, pid: int, job_id: str, process: str = "") -> tuple[str, str]:
    """(gRPC code, message) for a worker process that ended without a result or error of its own;
    `process` names it where it is not the one worker process."""
    process = process or f"the worker process (pid {pid}) of job {job_id}"
    kept = "what it stored before (checkpoints, samples) is kept"
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGKILL:
            return ("RESOURCE_EXHAUSTED",
                    f"{process} was killed by SIGKILL (signal 9), most likely by the kernel's out-of-memory killer "
                    f"(`dmesg` or `journalctl -k` says so); lower the resolution or batch size, enable gradient "
                    f"checkpointing, or give it more memory; {kept}")
        if number in _CRASH_SIGNALS:
            return ("INTERNAL",
                    f"{process} crashed with {name} (signal {number}): {_CRASH_SIGNALS[signal.Signals(number)]}; "
                    f"the server log has the worker's last lines; {kept}")
        return "ABORTED", f"{process} was stopped by {name} (signal {number}) from outside fluxlora; {kept}"
    if returncode == EXIT_INTERRUPTED:
        return "ABORTED", f"{process} was stopped from outside fluxlora (SIGTERM, exit {returncode}); {kept}"
    if returncode == EXIT_SUCCEEDED:
        return "INTERNAL", f"{process} exited 0 but stored no result; the server log has the worker's lines"
    return ("INTERNAL",
            f"{process} exited with code {returncode} before it stored a result or an error; the server log has "
            f"the worker's lines (logger names end in -worker); {kept}")


def ranks_failed(pid: int, job_id: str, processes: int, returncode: int) -> str:
    """The message of a data-parallel job whose launcher exited non-zero with no result or error stored."""
    return (f"a rank of job {job_id} failed: torchrun (pid {pid}) stopped its {processes} worker processes and "
            f"exited with that rank's code {returncode}; the server log has torchrun's summary (which rank, its exit "
            "code) and that rank's last lines; the checkpoints it stored are kept: resume with resume_from_run")


def _no_result(job_id: str, pid: int, returncode: int | None) -> NoReturn:
    raise RemoteJobFailed("INTERNAL", f"the worker of job {job_id} reported it finished but stored no result "
                                      f"(pid {pid}, exit {returncode}); the server log has the worker's lines")


def worker_env(settings: Settings, store: ArtifactStore) -> dict[str, str]:
    """The child's environment: this process's, with every FLUXLORA_* setting as this server has it
    (flags and code-given settings included) and the store the server actually uses. For an S3 store
    the endpoint and keys are the server's S3 settings."""
    server_only = tuple(f"FLUXLORA_{prefix.upper()}" for prefix in _SERVER_ONLY_PREFIXES)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(server_only)}
    for name in type(settings).model_fields:
        key = f"FLUXLORA_{name.upper()}"
        if name.startswith(_SERVER_ONLY_PREFIXES):
            continue
        value = getattr(settings, name)
        if value is None:
            env.pop(key, None)
        elif isinstance(value, SecretStr):
            env[key] = value.get_secret_value()
        elif isinstance(value, (dict, list)):
            env[key] = json.dumps(value)
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        else:
            env[key] = str(value)
    env["FLUXLORA_STORE"] = store.uri
    return env


def is_worker_of(pid: int, job_id: str) -> bool:
    """Whether process `pid` is alive and is a worker of `job_id` (its command line names the job: a
    reused pid is not mistaken for it). False where /proc cannot tell."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")  # empty for a zombie
    except OSError:
        return False
    return job_id.encode() in args


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
