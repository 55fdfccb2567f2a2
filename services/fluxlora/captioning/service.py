from fluxlora.captioning.job import run_caption
from fluxlora.captioning.servicer import CaptioningServicer
from fluxlora.jobs.definition import define
from fluxlora_api.shared.ports import JOB_PREFIXES
from fluxlora_api.v1 import captioning_pb2, captioning_pb2_grpc

SERVICE = define(
    "captioning", JOB_PREFIXES["captioning"],
    captioning_pb2, captioning_pb2_grpc, "CaptioningService",
    CaptioningServicer, run_caption,
)
