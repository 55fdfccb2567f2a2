"""The four services, their default ports and their job-id prefixes."""

from __future__ import annotations

SERVICES = ("preprocessing", "captioning", "training", "evaluation")
DEFAULT_PORTS = {"preprocessing": 50051, "captioning": 50052, "training": 50053, "evaluation": 50054}
# Job ids look like "<prefix>-1a2b3c4d5e6f": the prefix says which service holds the job.
JOB_PREFIXES = {"preprocessing": "pre", "captioning": "cap", "training": "trn", "evaluation": "evl"}
PREFIX_TO_SERVICE = {prefix: service for service, prefix in JOB_PREFIXES.items()}


def service_of_job(job_id: str) -> str | None:
    """The service that holds `job_id`, or None when it is not a fluxlora job id."""
    return PREFIX_TO_SERVICE.get(job_id.split("-", 1)[0])
