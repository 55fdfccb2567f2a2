"""The fluxlora Python SDK: typed calls to the four services, job watching with progress
callbacks, and upload/download helpers. The client holds no store credentials: the servers hand out
presigned, expiring URLs or stream the bytes over gRPC (fluxlora.v1.TransferService, transfers.py).

    client = FluxloraClient.from_env()
    source = client.upload_photos("photos/")
    job = client.wait(client.preprocess(source, base_size=1024))
    dataset_id = client.result(job).dataset_id
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from fluxlora_api.v1 import captioning_pb2, evaluation_pb2, jobs_pb2, preprocessing_pb2, training_pb2
from fluxlora_client.artifacts import ArtifactTransfers
from fluxlora_client.connection import RECONNECT_FOR_S
from fluxlora_client.errors import FluxloraClientError
from fluxlora_client.submits import JobSubmits
from fluxlora_client.watching import TERMINAL, JobWatching

if TYPE_CHECKING:
    from fluxlora_client.captions import CaptionReview

__all__ = ["RECONNECT_FOR_S", "RESULT_BY_NAME", "RESULT_TYPES", "TERMINAL", "FluxloraClient"]

RESULT_TYPES = {
    "preprocessing": preprocessing_pb2.PreprocessResult,
    "captioning": captioning_pb2.CaptionResult,
    "training": training_pb2.TrainResult,
    "evaluation": evaluation_pb2.GridResult,
}
RESULT_BY_NAME = {t.DESCRIPTOR.full_name: t for t in [*RESULT_TYPES.values(), evaluation_pb2.GenerateResult]}


class FluxloraClient(JobSubmits, ArtifactTransfers, JobWatching):
    """The SDK: connections (connection.py), submits (submits.py), uploads and downloads
    (artifacts.py), job watching (watching.py); here the typed results and specs and caption review."""

    @functools.cached_property
    def captions(self) -> CaptionReview:
        """Caption review: list, edit, replace, approve, history, export, HTML review page (captions.py)."""
        from fluxlora_client.captions import CaptionReview

        return CaptionReview(self)

    def result(self, job: jobs_pb2.Job) -> Any:
        """The job's typed result (PreprocessResult, CaptionResult, TrainResult or GridResult)."""
        # The evaluation service has two result types (GridResult, GenerateResult): go by the payload.
        message = RESULT_BY_NAME.get(job.result.TypeName(), RESULT_TYPES[job.service])()
        if not job.result.Unpack(message):
            raise FluxloraClientError("FAILED_PRECONDITION", f"job {job.job_id} has no result yet")
        return message

    def spec(self, job: jobs_pb2.Job) -> Any:
        name = job.spec.TypeName().rsplit(".", 1)[-1]
        module = {"PreprocessSpec": preprocessing_pb2, "CaptionSpec": captioning_pb2,
                  "TrainSpec": training_pb2, "GridSpec": evaluation_pb2, "GenerateSpec": evaluation_pb2}[name]
        message = getattr(module, name)()
        job.spec.Unpack(message)
        return message
