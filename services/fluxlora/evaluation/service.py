from fluxlora.common.server import ServiceDefinition
from fluxlora.evaluation.job import run_grid
from fluxlora.evaluation.servicer import EvaluationServicer
from fluxlora_api.v1 import evaluation_pb2, evaluation_pb2_grpc

SERVICE = ServiceDefinition(
    name="evaluation",
    job_prefix="evl",
    grpc_name=evaluation_pb2.DESCRIPTOR.services_by_name["EvaluationService"].full_name,
    handler=run_grid,
    add_servicer=lambda server, runtime: evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server(
        EvaluationServicer(runtime), server
    ),
)
