"""A fake Kubernetes API server over HTTP (the batch/v1 Jobs, v1 Pods and v1 Services endpoints the
launcher uses), and a fake kubelet that runs each created Job's worker in a thread, one per GPU.

With a LocalQueue added (`local_queues`), it models Kueue too: a Job created suspended with the
queue-name label gets a Workload (QuotaReserved False, Pending) and waits until `admit` unsuspends it
(adding the ResourceFlavor's node labels); `evict` (a preemption) suspends it again, which deletes its
pod (the worker gets its SIGTERM) and keeps the Job. Its `cluster_objects` hold the ClusterQueues and
ResourceFlavors the server reads (`kueue_objects`: the repository's own).

The real `kubernetes` Python client talks to it, so requests, bodies, label selectors, status codes
(201, 200, 404, 409) and response decoding all go through the client as they would on a cluster.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

JOBS = re.compile(r"^/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs(?:/(?P<name>[^/]+))?$")
WORKLOADS = re.compile(r"^/apis/kueue.x-k8s.io/v1beta1/namespaces/(?P<ns>[^/]+)/workloads$")
LOCAL_QUEUES = re.compile(r"^/apis/kueue.x-k8s.io/v1beta1/namespaces/(?P<ns>[^/]+)/localqueues/(?P<name>[^/]+)$")
CLUSTER_OBJECTS = re.compile(
    r"^/apis/kueue.x-k8s.io/v1beta1/(?P<kind>clusterqueues|resourceflavors)/(?P<name>[^/]+)$")
SERVICES = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/services(?:/(?P<name>[^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+))?$")
QUEUES = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "components" / "kueue" / "queues.yaml"


def kueue_objects() -> dict[str, dict]:
    """Kind -> the Kueue object as deploy/k8s/components/kueue ships it (ClusterQueue fluxlora-gpu,
    ResourceFlavor rtx4090, LocalQueue fluxlora, ...)."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(QUEUES.read_text()) if doc}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def matches(labels: dict, selector: str) -> bool:
    """Equality-based label selectors ("a=b,c=d"), what the launcher sends."""
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKubeAPI:
    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, job name) -> its one pod
        self.server_pods: dict[tuple[str, str], dict] = {}  # (namespace, pod name) -> pods of servers
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query) in order
        self.on_create: Callable[[str, dict], None] = lambda namespace, job: None
        self.on_delete: Callable[[str, str], None] = lambda namespace, name: None
        self.on_suspend: Callable[[str, str], None] = lambda namespace, name: None  # pods deleted
        self.on_unsuspend: Callable[[str, dict], None] = lambda namespace, job: None  # pods may start
        self.local_queues: dict[tuple[str, str], str] = {}  # (namespace, LocalQueue) -> ClusterQueue
        self.workloads: dict[tuple[str, str], dict] = {}  # (namespace, Job name) -> its Workload
        self.services: dict[tuple[str, str], dict] = {}  # (namespace, name) -> a created v1 Service
        # Kueue's cluster-scoped objects as applied: ("clusterqueues" | "resourceflavors", name) -> object
        self.cluster_objects: dict[tuple[str, str], dict] = {}
        self.lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKubeAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- what a cluster's controllers would do -----------------------------------------------
    def add_job(self, namespace: str, manifest: dict) -> dict:
        job = copy.deepcopy(manifest)
        meta = job.setdefault("metadata", {})
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), resourceVersion="1", creationTimestamp=_now())
        job["status"] = {"startTime": _now(), "active": 0}
        self.jobs[(namespace, meta["name"])] = job
        queue = meta.get("labels", {}).get("kueue.x-k8s.io/queue-name")
        if queue and (namespace, queue) in self.local_queues:
            self._set_suspended(job, True, "JobSuspended", "Job suspended")
            self.workloads[(namespace, meta["name"])] = {
                "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                "metadata": {"name": f"job-{meta['name']}-1a2b3", "namespace": namespace,
                             "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                  "uid": meta["uid"], "controller": True}]},
                # One pod set of all the Job's pods (parallelism): Kueue admits them together or not at all.
                "spec": {"queueName": queue, "podSets": [{"name": "main",
                                                          "count": job["spec"].get("parallelism", 1)}]},
                "status": {"conditions": [self._condition("QuotaReserved", "False", "Pending", (
                    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
                    "flavor rtx4090, 1 more needed"))]}}
        return job

    @staticmethod
    def _condition(kind: str, status: str, reason: str, message: str) -> dict:
        return {"type": kind, "status": status, "reason": reason, "message": message,
                "lastTransitionTime": _now()}

    def _set_suspended(self, job: dict, suspended: bool, reason: str, message: str) -> None:
        job["spec"]["suspend"] = suspended
        conditions = [c for c in job["status"].get("conditions", []) if c["type"] != "Suspended"]
        job["status"]["conditions"] = [*conditions, self._condition("Suspended", str(suspended), reason, message)]

    def admit(self, namespace: str, name: str, node_labels: dict | None = None) -> None:
        """Kueue admits the Job's Workload: the flavor's node labels go into the pod template, the
        Job is unsuspended and its pod can start."""
        with self.lock:
            job = self.jobs[(namespace, name)]
            pod_spec = job["spec"]["template"]["spec"]
            pod_spec["nodeSelector"] = {**pod_spec.get("nodeSelector", {}), **(node_labels or {})}
            self._set_suspended(job, False, "JobResumed", "Job resumed")
            queue = job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
            workload = self.workloads[(namespace, name)]
            workload["status"] = {
                "admission": {"clusterQueue": self.local_queues[(namespace, queue)], "podSetAssignments": []},
                "conditions": [self._condition("QuotaReserved", "True", "QuotaReserved", "Quota reserved"),
                               self._condition("Admitted", "True", "Admitted", "The workload is admitted")]}
            job = copy.deepcopy(job)
        self.on_unsuspend(namespace, job)

    def evict(self, namespace: str, name: str) -> None:
        """Kueue preempts the Workload: the Job is suspended again, its pod deleted (SIGTERM)."""
        with self.lock:
            job = self.jobs[(namespace, name)]
            self._set_suspended(job, True, "JobSuspended", "Job suspended")
            job["status"]["active"] = 0
            self.pods.pop((namespace, name), None)
            self.workloads[(namespace, name)]["status"] = {"conditions": [
                self._condition("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: "
                                "0b1c, JobUID: 9f8e) due to prioritization in the ClusterQueue"),
                self._condition("QuotaReserved", "False", "Pending", "Preempted")]}
        self.on_suspend(namespace, name)

    def set_pod(self, namespace: str, name: str, phase: str, unschedulable: str = "") -> None:
        with self.lock:
            labels = self.jobs[(namespace, name)]["spec"]["template"]["metadata"]["labels"]
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{name}-abcde", "namespace": namespace,
                                "labels": {**labels, "job-name": name}},
                   "spec": {"containers": [{"name": "worker", "image": "x"}]},
                   "status": {"phase": phase, "conditions": []}}
            if unschedulable:
                pod["status"]["conditions"].append({"type": "PodScheduled", "status": "False",
                                                    "reason": "Unschedulable", "message": unschedulable})
            self.pods[(namespace, name)] = pod
            self.jobs[(namespace, name)]["status"]["active"] = 1

    def finish(self, namespace: str, name: str, succeeded: bool, reason: str = "", message: str = "") -> None:
        with self.lock:
            job = self.jobs.get((namespace, name))
            if job is None:
                return
            kind = "Complete" if succeeded else "Failed"
            job["status"].update(active=0, **({"succeeded": 1} if succeeded else {"failed": 1}))
            job["status"]["conditions"] = [{"type": kind, "status": "True", "reason": reason, "message": message,
                                            "lastTransitionTime": _now(), "lastProbeTime": _now()}]
            self.pods.pop((namespace, name), None)

    def requests_of(self, method: str) -> list[tuple[str, str, dict]]:
        return [r for r in self.requests if r[0] == method]

    # --- HTTP --------------------------------------------------------------------------------
    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                with fake.lock:
                    fake.requests.append((method, url.path, query))
                    code, reply, after = fake._answer(method, url.path, query, body)
                self._reply(code, reply)
                if after:
                    after()

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler

    def _answer(self, method: str, path: str, query: dict, body: dict):
        if m := JOBS.match(path):
            ns, name = m["ns"], m["name"]
            if method == "POST" and not name:
                name = body["metadata"]["name"]
                if (ns, name) in self.jobs:
                    return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists'), None
                job = self.add_job(ns, body)
                return 201, job, lambda: self.on_create(ns, copy.deepcopy(job))
            if method == "GET" and not name:
                items = [j for (n, _), j in self.jobs.items()
                         if n == ns and matches(j["metadata"].get("labels", {}), query.get("labelSelector", ""))]
                return 200, {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items}, None
            if (ns, name) not in self.jobs:
                return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found'), None
            if method == "GET":
                return 200, self.jobs[(ns, name)], None
            if method == "DELETE":
                uid = self.jobs.pop((ns, name))["metadata"]["uid"]
                for key in [k for k, svc in self.services.items()  # the garbage collector's part
                            if any(o["uid"] == uid for o in svc["metadata"].get("ownerReferences", []))]:
                    del self.services[key]
                self.pods.pop((ns, name), None)
                self.workloads.pop((ns, name), None)
                return 200, _status(200, "", "") | {"status": "Success"}, lambda: self.on_delete(ns, name)
        if (m := SERVICES.match(path)) and method == "POST" and not m["name"]:
            key = (m["ns"], body["metadata"]["name"])
            if key in self.services:
                return 409, _status(409, "AlreadyExists", f'services "{key[1]}" already exists'), None
            self.services[key] = copy.deepcopy(body) | {"status": {"loadBalancer": {}}}
            self.services[key]["metadata"].update(namespace=m["ns"], uid=str(uuid.uuid4()))
            return 201, self.services[key], None
        if (m := LOCAL_QUEUES.match(path)) and method == "GET":
            cluster_queue = self.local_queues.get((m["ns"], m["name"]))
            if cluster_queue is None:  # no such LocalQueue, or no Kueue at all
                return 404, _status(404, "NotFound", "the server could not find the requested resource"), None
            return 200, {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue",
                         "metadata": {"name": m["name"], "namespace": m["ns"]},
                         "spec": {"clusterQueue": cluster_queue}}, None
        if (m := CLUSTER_OBJECTS.match(path)) and method == "GET":
            found = self.cluster_objects.get((m["kind"], m["name"]))
            if found is None:
                return 404, _status(404, "NotFound", f'{m["kind"]}.kueue.x-k8s.io "{m["name"]}" not found'), None
            return 200, found, None
        if (m := WORKLOADS.match(path)) and method == "GET":
            items = [w for (n, _), w in self.workloads.items()
                     if n == m["ns"] and matches(w["metadata"]["labels"], query.get("labelSelector", ""))]
            return 200, {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "WorkloadList", "metadata": {},
                         "items": items}, None
        if (m := PODS.match(path)) and method == "GET" and m["name"]:
            pod = self.server_pods.get((m["ns"], m["name"]))
            if pod is None:
                return 404, _status(404, "NotFound", f'pods "{m["name"]}" not found'), None
            return 200, pod, None
        if (m := PODS.match(path)) and method == "GET":
            items = [p for (n, _), p in self.pods.items()
                     if n == m["ns"] and matches(p["metadata"]["labels"], query.get("labelSelector", ""))]
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}, None
        return 404, _status(404, "NotFound", f"no route {method} {path}"), None


class FakeKubelet:
    """Runs each created Job's worker (the real `run_worker`) in a thread when a GPU is free;
    until then the Job's pod is Pending and Unschedulable, as on a cluster whose GPUs are busy.
    Exit 0 completes the Job; another exit code fails it (as backoffLimit 0 would), unless the Job
    was suspended meanwhile (Kueue's preemption: its pod goes, the Job stays). A suspended Job gets
    no pod until it is unsuspended. `pods_started` counts pods per Job."""

    def __init__(self, api: FakeKubeAPI, run: Callable[[str, str, threading.Event], int], gpus: int = 1):
        self.api = api
        self.run = run  # (service, job_id, stop) -> exit code
        self.gpus = gpus
        self.waiting: list[tuple[str, dict]] = []
        self.running: dict[str, threading.Event] = {}
        self.exit_codes: dict[str, int] = {}
        self.pods_started: dict[str, int] = {}
        self.lock = threading.Lock()
        api.on_create = self.created
        api.on_delete = self.deleted
        api.on_suspend = self.deleted
        api.on_unsuspend = self.created

    def created(self, namespace: str, job: dict) -> None:
        if job["spec"].get("suspend"):
            return
        with self.lock:
            self.waiting.append((namespace, job))
        self._schedule()

    def deleted(self, namespace: str, name: str) -> None:
        with self.lock:
            self.waiting = [(ns, j) for ns, j in self.waiting if j["metadata"]["name"] != name]
            stop = self.running.get(name)
        if stop:
            stop.set()  # the pod's SIGTERM

    def _schedule(self) -> None:
        with self.lock:
            while self.waiting and len(self.running) < self.gpus:
                namespace, job = self.waiting.pop(0)
                name = job["metadata"]["name"]
                self.running[name] = threading.Event()
                self.pods_started[name] = self.pods_started.get(name, 0) + 1
                self.api.set_pod(namespace, name, "Running")
                threading.Thread(target=self._run_pod, args=(namespace, job), daemon=True).start()
            for namespace, job in self.waiting:
                self.api.set_pod(namespace, job["metadata"]["name"], "Pending", unschedulable=(
                    "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are "
                    "available: 1 No preemption victims found for incoming pod."))

    def _run_pod(self, namespace: str, job: dict) -> None:
        name = job["metadata"]["name"]
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        if "--no-python" in command:  # several GPUs, under torchrun: the fake runs one worker for all the ranks
            command = command[command.index("--no-python") + 1:]
        assert command[:2] == ["fluxlora", "worker"], command
        code = self.run(command[2], command[3], self.running[name])
        self.exit_codes[name] = code
        with self.api.lock:
            suspended = self.api.jobs.get((namespace, name), {}).get("spec", {}).get("suspend")
        if not suspended:
            self.api.finish(namespace, name, code == 0, reason="" if code == 0 else "PodFailurePolicy",
                            message="" if code == 0 else f"Container worker for pod {name}-abcde failed with "
                                                         f"exit code {code} matching FailJob rule at index 0")
        with self.lock:
            self.running.pop(name, None)
        self._schedule()


def use_kubeconfig(api: FakeKubeAPI, folder, monkeypatch, namespace: str) -> None:
    """Points the real kubernetes client at `api` through a kubeconfig in `folder`, as on a machine
    outside the cluster (no in-cluster service account to find)."""
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{api.url}'}}}}]\n"
        "users: [{name: fake, user: {token: fake-token}}]\n"
        f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {namespace}}}}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
