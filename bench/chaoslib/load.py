"""The load: client threads running preprocess -> caption -> approve -> train -> evaluate through the
SDK with request_ids (resubmitted with the same id while the answer is UNAVAILABLE), a watcher thread
per accepted job that records every event the SDK's watch gave it, and bursts of hostile requests."""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, FluxloraClientError

S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
# what a hostile request may be answered with (never INTERNAL/UNKNOWN, never accepted)
DELIBERATE = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
              "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}


@dataclass
class Watch:
    job_id: str
    states: list[int] = field(default_factory=list)
    error: str = ""
    done: bool = False


@dataclass
class Record:
    """Everything the clients saw, for the checks."""
    answers: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (service, request_id) -> job ids
    jobs: dict[str, str] = field(default_factory=dict)  # job_id -> service
    watches: dict[str, Watch] = field(default_factory=dict)
    hostile: list[tuple[str, str, str]] = field(default_factory=list)  # (what, outcome code, message)
    hostile_jobs: set[str] = field(default_factory=set)
    pipelines: dict[str, str] = field(default_factory=dict)  # pipeline -> how it ended
    observed: dict[str, set[int]] = field(default_factory=dict)  # job_id -> terminal states GetJob answered
    refusals: list[tuple[str, str, str]] = field(default_factory=list)  # (call, code, message): not retryable
    datasets: list[str] = field(default_factory=list)  # succeeded preprocessing results (hostile requests use them)
    resubmits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self, service: str, request_id: str, job: jobs_pb2.Job) -> bool:
        """Notes an accepted submit; True when the job is new to the run (start a watcher)."""
        with self.lock:
            self.answers.setdefault((service, request_id), []).append(job.job_id)
            new = job.job_id not in self.jobs
            self.jobs[job.job_id] = service
            if new:
                self.watches[job.job_id] = Watch(job.job_id)
            return new


class Load:
    def __init__(self, client_factory, photos: list[Path], models: dict[str, Path], rng: random.Random,
                 tag: str):
        self.client_factory = client_factory
        self.photos = photos
        self.models = models
        self.rng = rng
        self.tag = tag
        self.record = Record()
        self.stopping = threading.Event()  # no new stages once set
        self.threads: list[threading.Thread] = []
        self.watchers: list[threading.Thread] = []

    # --- watchers ------------------------------------------------------------------------
    def watch(self, client: FluxloraClient, job_id: str) -> None:
        watch = self.record.watches[job_id]

        def run() -> None:
            try:
                for event in client.watch(job_id):  # the SDK's watch, reconnecting as it does
                    watch.states.append(event.job.state)
            except Exception as exc:  # noqa: BLE001 - what the watcher saw is the point
                watch.error = f"{type(exc).__name__}: {getattr(exc, 'code', '')} {str(exc)[:200]}"
            watch.done = True

        thread = threading.Thread(target=run, daemon=True, name=f"watch-{job_id}")
        thread.start()
        self.watchers.append(thread)

    # --- submitting ------------------------------------------------------------------------
    def submit(self, client: FluxloraClient, service: str, request_id: str, call, deadline: float):
        """call() until it is answered with something other than UNAVAILABLE/DEADLINE_EXCEEDED (the
        same request_id every time); the job, or the error."""
        while True:
            try:
                job = call()
            except FluxloraClientError as err:
                if err.code in RETRYABLE and time.monotonic() < deadline:
                    with self.record.lock:
                        self.record.resubmits += 1
                    time.sleep(1.0)
                    continue
                with self.record.lock:
                    self.record.refusals.append((request_id, err.code, err.message[:200]))
                raise
            if self.record.accepted(service, request_id, job):
                self.watch(client, job.job_id)
            return job

    def final(self, client: FluxloraClient, job_id: str, deadline: float) -> jobs_pb2.Job | None:
        """Polls GetJob (not the watcher's view) until the job is terminal; None at the deadline."""
        while time.monotonic() < deadline:
            try:
                job = client.get_job(job_id)
                if job.state in TERMINAL:
                    with self.record.lock:
                        self.record.observed.setdefault(job_id, set()).add(job.state)
                    return job
            except FluxloraClientError:
                pass
            time.sleep(1.0)
        return None

    def stage(self, client, name: str, service: str, request_id: str, call, deadline: float):
        job = self.submit(client, service, request_id, call, deadline)
        final = self.final(client, job.job_id, deadline)
        if final is None:
            raise StageEnded(f"{name}: not finished by the deadline")
        if final.state != S.JOB_STATE_SUCCEEDED:
            raise StageEnded(f"{name}: {S.Name(final.state)} {final.error.code}")
        return client.result(final)

    # --- pipelines ---------------------------------------------------------------------------
    def pipeline(self, client: FluxloraClient, name: str, photos: Path, steps: int, deadline: float) -> str:
        rid = f"{self.tag}-{name}"
        source = None
        while source is None:
            try:
                source = client.upload_photos(photos)
            except Exception:  # noqa: BLE001 - the store may be down: try again, like a user
                if self.stopping.is_set():
                    raise StageEnded("upload: stopped") from None
                time.sleep(2.0)
        dataset = self.stage(client, "preprocess", "preprocessing", f"{rid}-pre", lambda: client.preprocess(
            source, base_size=64, request_id=f"{rid}-pre"), deadline)
        self.record.datasets.append(dataset.dataset_id)
        self.check_stop()
        captions = self.stage(client, "caption", "captioning", f"{rid}-cap", lambda: client.caption(
            dataset.dataset_id, "chaosone", model=str(self.models["florence2"]), batch_size=2, max_new_tokens=12,
            request_id=f"{rid}-cap"), deadline)
        self.check_stop()
        approved = None
        while approved is None:
            try:
                approved = client.captions.approve(dataset.dataset_id, captions.version, author="chaos")
            except FluxloraClientError as err:
                if err.code not in RETRYABLE or self.stopping.is_set():
                    raise StageEnded(f"approve: {err.code}") from None
                time.sleep(1.0)
        run = self.stage(client, "train", "training", f"{rid}-trn", lambda: client.train(
            dataset.dataset_id, base_model=str(self.models["flux"]), resolution=64, max_steps=steps,
            checkpoint_every=max(1, steps // 3), sample_every=0, rank=4, caption_version=approved.version.version,
            request_id=f"{rid}-trn"), deadline)
        self.check_stop()
        self.stage(client, "evaluate", "evaluation", f"{rid}-grid", lambda: client.evaluate(
            run.run_id, strengths=[0.0, 1.0], steps=2, width=64, height=64, image_text_model="none",
            skip_convergence=True, request_id=f"{rid}-grid"), deadline)
        return "SUCCEEDED"

    def check_stop(self) -> None:
        if self.stopping.is_set():
            raise StageEnded("stopped with the faults")

    def client_loop(self, index: int, deadline: float) -> None:
        client = self.client_factory()
        number = 0
        while not self.stopping.is_set():
            number += 1
            name = f"c{index}p{number}"
            steps = self.rng.choice([6, 9, 12])
            try:
                outcome = self.pipeline(client, name, self.photos[(index + number) % len(self.photos)], steps,
                                        deadline)
            except StageEnded as end:
                outcome = str(end)
            except FluxloraClientError as err:
                outcome = f"refused {err.code}: {err.message[:120]}"
            except Exception as exc:  # noqa: BLE001 - a harness error shows up in the report
                outcome = f"harness error {type(exc).__name__}: {exc}"
            with self.record.lock:
                self.record.pipelines[name] = outcome
            if outcome != "SUCCEEDED":
                time.sleep(2.0)  # a user does not resubmit in a tight loop (and the report stays readable)

    def start(self, clients: int, deadline: float) -> None:
        for i in range(clients):
            thread = threading.Thread(target=self.client_loop, args=(i, deadline), daemon=True, name=f"client-{i}")
            thread.start()
            self.threads.append(thread)

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    # --- hostile requests ------------------------------------------------------------------------
    def hostile(self, rng: random.Random) -> str:
        """A burst of hostile requests; each must be refused with a deliberate status."""
        client = self.client_factory()
        big = "x" * 1_000_000
        dup = None
        with self.record.lock:
            accepted = [(s, r, ids[0]) for (s, r), ids in self.record.answers.items() if s == "preprocessing"]
        if accepted:
            dup = rng.choice(accepted)
        flux = str(self.models["flux"])
        # a real dataset where there is one, so a bad number is what the server has to catch
        ds = rng.choice(self.record.datasets) if self.record.datasets else "ds-000000000000"
        cases = [
            ("train max_steps=-5", lambda: client.train(ds, base_model=flux, max_steps=-5, resolution=64)),
            ("train learning_rate=nan", lambda: client.train(ds, base_model=flux, learning_rate=math.nan,
                                                             max_steps=2, resolution=64)),
            ("train resolution=-64", lambda: client.train(ds, base_model=flux, resolution=-64, max_steps=2)),
            ("train rank=-4", lambda: client.train(ds, base_model=flux, rank=-4, max_steps=2, resolution=64)),
            ("preprocess base_size=-1", lambda: client.preprocess("uploads/none/", base_size=-1)),
            ("preprocess ../ prefix", lambda: client.preprocess("../../etc/", base_size=64)),
            ("caption 1 MB trigger", lambda: client.caption(ds, big, model=str(self.models["florence2"]))),
            ("caption batch_size=-3", lambda: client.caption(ds, "chaosone", model=str(self.models["florence2"]),
                                                             batch_size=-3, max_new_tokens=-1)),
            ("evaluate width=-5", lambda: client.evaluate("trn-000000000000", width=-5)),
            ("evaluate steps=-1 inf strength", lambda: client.evaluate("trn-000000000000", strengths=[math.inf],
                                                                       steps=-1)),
            ("get unknown job", lambda: client.get_job("trn-ffffffffffff")),
            ("cancel unknown job", lambda: client.cancel("cap-ffffffffffff")),
            ("watch unknown job", lambda: list(client.watch("grd-ffffffffffff"))),
            ("get ../ job id", lambda: client.get_job("pre-../../etc/passwd")),
            ("1 MB request_id", lambda: client.preprocess("uploads/none/", base_size=64, request_id=big)),
        ]
        if dup is not None:
            service, request_id, job_id = dup
            cases.append(("same request_id, other spec", lambda: client.preprocess(
                f"uploads/other-{uuid.uuid4().hex[:6]}/", base_size=96, request_id=request_id)))
        for what, call in rng.sample(cases, k=min(len(cases), 6)):
            try:
                answer = call()
            except FluxloraClientError as err:
                self.record.hostile.append((what, err.code, err.message[:200]))
                continue
            except Exception as exc:  # noqa: BLE001
                self.record.hostile.append((what, f"client exception {type(exc).__name__}", str(exc)[:200]))
                continue
            if isinstance(answer, jobs_pb2.Job) and answer.job_id:
                service = {"pre": "preprocessing", "cap": "captioning", "trn": "training",
                           "grd": "evaluation"}.get(answer.job_id.split("-")[0], "?")
                if what == "same request_id, other spec" and dup is not None and answer.job_id == dup[2]:
                    self.record.hostile.append((what, "ANSWERED WITH THE FIRST JOB", answer.job_id))
                    continue
                self.record.hostile.append((what, "ACCEPTED", answer.job_id))
                with self.record.lock:
                    self.record.jobs[answer.job_id] = service
                    self.record.hostile_jobs.add(answer.job_id)
                    self.record.watches[answer.job_id] = Watch(answer.job_id)
                self.watch(client, answer.job_id)
            else:
                self.record.hostile.append((what, "ANSWERED", ""))
        return f"{min(len(cases), 6)} hostile requests"


class StageEnded(Exception):
    pass
