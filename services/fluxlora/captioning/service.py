from fluxlora.captioning.job import run_caption
from fluxlora.captioning.servicer import CaptioningServicer
from fluxlora.common.server import ServiceDefinition
from fluxlora_api.v1 import captioning_pb2, captioning_pb2_grpc

SERVICE = ServiceDefinition(
    name="captioning",
    job_prefix="cap",
    grpc_name=captioning_pb2.DESCRIPTOR.services_by_name["CaptioningService"].full_name,
    handler=run_caption,
    add_servicer=lambda server, runtime: captioning_pb2_grpc.add_CaptioningServiceServicer_to_server(
        CaptioningServicer(runtime), server
    ),
)
