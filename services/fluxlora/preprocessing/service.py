from fluxlora.jobs.definition import define
from fluxlora.preprocessing.job import run_preprocess
from fluxlora.preprocessing.servicer import PreprocessingServicer
from fluxlora_api.shared.ports import JOB_PREFIXES
from fluxlora_api.v1 import preprocessing_pb2, preprocessing_pb2_grpc

SERVICE = define(
    "preprocessing", JOB_PREFIXES["preprocessing"],
    preprocessing_pb2, preprocessing_pb2_grpc, "PreprocessingService",
    PreprocessingServicer, run_preprocess,
)
