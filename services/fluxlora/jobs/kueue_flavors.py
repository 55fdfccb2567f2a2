"""The GPUs a Kueue ClusterQueue can give a Job: its ResourceFlavors, each flavor's GPU model and
memory (from the flavor's node labels) and GPU quota, read through the Kubernetes API.

Kueue assigns flavors by quota, in the ClusterQueue's order, and knows nothing of GPU memory: a run
may land on any flavor with nvidia.com/gpu quota. So the memory planner plans against the smallest
GPU among them (`smallest`), and says which flavor that is.

Kueue admits a Job's pods together, all in one flavor, and only within what that flavor can ever
give (its nominal quota, plus its borrowingLimit when the ClusterQueue is in a cohort): a Job asking
for more GPUs than every flavor's `gpu_limit` is never admitted, however long it waits
(`over_quota` says so before it is created).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GPU = "nvidia.com/gpu"
KUEUE = ("kueue.x-k8s.io", "v1beta1")
# GPU Feature Discovery (part of the NVIDIA GPU operator) labels nodes with the card's memory in MiB;
# a flavor that copies that label into its nodeLabels says its memory exactly.
MEMORY_LABEL = "nvidia.com/gpu.memory"
PRODUCT_LABEL = "nvidia.com/gpu.product"
# Otherwise the product label's value (as GFD writes it) names a card of known memory (GiB).
KNOWN_GPUS = {
    "NVIDIA-GeForce-RTX-3090": 24.0,
    "NVIDIA-GeForce-RTX-4090": 24.0,
    "NVIDIA-GeForce-RTX-5090": 32.0,
    "NVIDIA-RTX-A6000": 48.0,
    "NVIDIA-L4": 22.5,
    "NVIDIA-A10G": 22.5,
    "NVIDIA-L40S": 45.0,
    "NVIDIA-A100-SXM4-40GB": 40.0,
    "NVIDIA-A100-SXM4-80GB": 80.0,
    "NVIDIA-A100-80GB-PCIe": 80.0,
    "NVIDIA-H100-80GB-HBM3": 80.0,
    "NVIDIA-H100-PCIe": 80.0,
    "NVIDIA-H200": 141.0,
}


@dataclass(frozen=True)
class Flavor:
    name: str
    gpu_product: str  # "" when the flavor's node labels do not say
    gpu_memory_gib: float | None  # None when neither label says
    gpu_quota: int  # the ClusterQueue's nominal nvidia.com/gpu quota in this flavor
    # GPUs it may borrow beyond that from its cohort (borrowingLimit); None: no limit (a cohort and
    # no borrowingLimit: as much as the cohort has unused, which this server does not add up)
    gpu_borrowing: int | None = 0

    @property
    def gpu_limit(self) -> int | None:
        """The most GPUs Kueue can ever give one Job in this flavor; None: no limit known."""
        return None if self.gpu_borrowing is None else self.gpu_quota + self.gpu_borrowing

    def fits_quota(self, gpus: int) -> bool:
        return self.gpu_limit is None or gpus <= self.gpu_limit

    def describe_quota(self) -> str:
        if self.gpu_borrowing is None:
            return f"{self.gpu_quota} GPUs of quota, and its cohort's unused GPUs without limit"
        if self.gpu_borrowing:
            return f"{self.gpu_quota} GPUs of quota + {self.gpu_borrowing} borrowable from its cohort"
        return f"{self.gpu_quota} GPUs of quota"

    def describe(self) -> str:
        memory = f"{self.gpu_memory_gib:g} GiB" if self.gpu_memory_gib is not None else "memory unknown"
        card = f"{self.gpu_product}, " if self.gpu_product else ""
        return f"{self.name} ({card}{memory}, {self.gpu_quota} GPUs of quota)"


@dataclass(frozen=True)
class ClusterQueueGpus:
    cluster_queue: str
    flavors: tuple[Flavor, ...]  # with GPU quota, in the ClusterQueue's order

    def smallest(self) -> Flavor | None:
        """The flavor of least GPU memory (among those that say): what a run must fit."""
        known = [f for f in self.flavors if f.gpu_memory_gib is not None]
        return min(known, key=lambda f: f.gpu_memory_gib or 0.0) if known else None

    def over_quota(self, gpus: int, what: str = "the run") -> str | None:
        """Why Kueue would never admit a Job of `gpus` GPUs here (no flavor can ever give that many),
        with the fix; None when some flavor can (it may still wait for them to be free), or when the
        queue has no GPU flavor this server can read."""
        if not self.flavors or any(f.fits_quota(gpus) for f in self.flavors):
            return None
        most = max(f.gpu_limit or 0 for f in self.flavors)
        flavors = "; ".join(f"flavor {f.name}: {f.describe_quota()}" for f in self.flavors)
        fewer = f"ask for at most {most} GPUs, or " if most else ""
        return (f"{what} asks for {gpus} GPUs, more than ClusterQueue {self.cluster_queue} can ever admit "
                f"in one flavor ({flavors}), so Kueue would never admit it: {fewer}raise the {GPU} "
                f"nominalQuota of a flavor of ClusterQueue {self.cluster_queue} (deploy/k8s/components/kueue/"
                "queues.yaml)")


def gpu_memory_gib(node_labels: dict[str, str]) -> float | None:
    if MEMORY_LABEL in node_labels:
        try:
            return int(node_labels[MEMORY_LABEL]) / 1024
        except ValueError:
            log.warning("ResourceFlavor label %s=%r is not MiB", MEMORY_LABEL, node_labels[MEMORY_LABEL])
    return KNOWN_GPUS.get(node_labels.get(PRODUCT_LABEL, ""))


def gpu_quotas(cluster_queue: dict) -> list[tuple[str, int]]:
    """(flavor, nominal GPU quota) for each flavor of the ClusterQueue that covers nvidia.com/gpu."""
    return [(name, _count(resource.get("nominalQuota", 0))) for name, resource in _gpu_resources(cluster_queue)]


def gpu_borrowing(cluster_queue: dict) -> dict[str, int | None]:
    """Flavor -> the GPUs the ClusterQueue may borrow in it beyond its nominal quota: 0 outside a
    cohort (Kueue requires borrowingLimit unset there, and nothing can be borrowed), its borrowingLimit
    in one, None (no limit) in a cohort without a borrowingLimit."""
    in_cohort = bool((cluster_queue.get("spec") or {}).get("cohort"))
    borrowing: dict[str, int | None] = {}
    for name, resource in _gpu_resources(cluster_queue):
        limit = resource.get("borrowingLimit")
        borrowing[name] = (_count(limit) if limit is not None else None) if in_cohort else 0
    return borrowing


def _gpu_resources(cluster_queue: dict) -> list[tuple[str, dict]]:
    """(flavor, its nvidia.com/gpu entry) for each flavor of the ClusterQueue's resource groups
    covering nvidia.com/gpu."""
    found = []
    for group in (cluster_queue.get("spec") or {}).get("resourceGroups") or []:
        if GPU not in (group.get("coveredResources") or []):
            continue
        for flavor in group.get("flavors") or []:
            for resource in flavor.get("resources") or []:
                if resource.get("name") == GPU:
                    found.append((flavor["name"], resource))
    return found


def asks_for_gpus(resources: dict) -> bool:
    """Whether a worker container of these resources (FLUXLORA_K8S_RESOURCES) takes nvidia.com/gpu
    quota; a CPU-only overlay's does not."""
    return any(GPU in (resources.get(section) or {}) for section in ("limits", "requests"))


def _count(quantity: Any) -> int:
    try:
        return int(str(quantity))
    except ValueError:  # a GPU quota is a whole number; anything else says nothing useful
        return 0


def read_cluster_queue_gpus(custom_api: Any, namespace: str, local_queue: str,
                            timeout_s: float = 30.0) -> ClusterQueueGpus | None:
    """The GPUs behind a LocalQueue; None when Kueue, the queues or the right to read them are missing
    (the planner then falls back to its other targets, and the log says why)."""
    from kubernetes.client.exceptions import ApiException

    try:
        queue = custom_api.get_namespaced_custom_object(*KUEUE, namespace, "localqueues", local_queue,
                                                        _request_timeout=timeout_s)
        name = (queue.get("spec") or {}).get("clusterQueue", "")
        cluster_queue = custom_api.get_cluster_custom_object(*KUEUE, "clusterqueues", name,
                                                             _request_timeout=timeout_s)
        flavors = []
        borrowing = gpu_borrowing(cluster_queue)
        for flavor_name, quota in gpu_quotas(cluster_queue):
            flavor = custom_api.get_cluster_custom_object(*KUEUE, "resourceflavors", flavor_name,
                                                          _request_timeout=timeout_s)
            labels = (flavor.get("spec") or {}).get("nodeLabels") or {}
            flavors.append(Flavor(flavor_name, labels.get(PRODUCT_LABEL, ""), gpu_memory_gib(labels), quota,
                                  borrowing.get(flavor_name, 0)))
    except ApiException as exc:
        log.warning("cannot read the GPUs of LocalQueue %s/%s (%s %s): planning without them; the server's "
                    "ServiceAccount needs get on localqueues, clusterqueues and resourceflavors",
                    namespace, local_queue, exc.status, exc.reason)
        return None
    return ClusterQueueGpus(name, tuple(flavors))
