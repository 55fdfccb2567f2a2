"""fluxlora.v1.JobService over a JobRuntime; every server hosts one for its own jobs."""

from __future__ import annotations

import grpc

from fluxlora.common.grpc_status import grpc_errors
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.jobs.webhooks import WebhookDispatcher, stored_deliveries
from fluxlora_api.shared.errors import InvalidArgument
from fluxlora_api.v1 import jobs_pb2, jobs_pb2_grpc


def _job_id(request) -> str:
    if not request.job_id.strip():
        raise InvalidArgument("job_id is empty")
    return request.job_id.strip()


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, runtime: JobRuntime, webhooks: WebhookDispatcher | None = None):
        self.runtime = runtime
        self.webhooks = webhooks

    @grpc_errors
    def GetJob(self, request, context):
        return self.runtime.get(_job_id(request))

    @grpc_errors
    def ListJobs(self, request, context):
        if request.page_size < 0:
            raise InvalidArgument("page_size must be >= 0")
        jobs, token, from_memory = self.runtime.page_or_memory(list(request.states), request.page_size,
                                                               request.page_token)
        return jobs_pb2.ListJobsResponse(jobs=jobs, next_page_token=token, from_memory=from_memory)

    @grpc_errors
    def CancelJob(self, request, context):
        return self.runtime.cancel(_job_id(request))

    @grpc_errors
    def WatchJob(self, request, context: grpc.ServicerContext):
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence must be >= 0 (the sequence of the last event seen, or 0)")
        yield from self.runtime.watch(_job_id(request), is_active=context.is_active, after=request.after_sequence)

    @grpc_errors
    def ListWebhookDeliveries(self, request, context):
        job = self.runtime.get(_job_id(request))  # NOT_FOUND for an unknown job
        if self.webhooks is not None:
            return self.webhooks.deliveries(job.job_id)
        return stored_deliveries(self.runtime.store, self.runtime.service, job.job_id)
