from fluxlora.common.server import ServiceDefinition
from fluxlora.preprocessing.job import run_preprocess
from fluxlora.preprocessing.servicer import PreprocessingServicer
from fluxlora_api.v1 import preprocessing_pb2, preprocessing_pb2_grpc

SERVICE = ServiceDefinition(
    name="preprocessing",
    job_prefix="pre",
    grpc_name=preprocessing_pb2.DESCRIPTOR.services_by_name["PreprocessingService"].full_name,
    handler=run_preprocess,
    add_servicer=lambda server, runtime: preprocessing_pb2_grpc.add_PreprocessingServiceServicer_to_server(
        PreprocessingServicer(runtime), server
    ),
)
