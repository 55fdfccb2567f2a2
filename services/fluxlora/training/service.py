from fluxlora.common.server import ServiceDefinition
from fluxlora.training.job import run_training
from fluxlora.training.servicer import TrainingServicer
from fluxlora_api.v1 import training_pb2, training_pb2_grpc

SERVICE = ServiceDefinition(
    name="training",
    job_prefix="trn",
    grpc_name=training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
    handler=run_training,
    add_servicer=lambda server, runtime: training_pb2_grpc.add_TrainingServiceServicer_to_server(
        TrainingServicer(runtime), server
    ),
)
