from fluxlora.jobs.definition import define
from fluxlora.training.job import run_training
from fluxlora.training.servicer import TrainingServicer
from fluxlora_api.shared.ports import JOB_PREFIXES
from fluxlora_api.v1 import training_pb2, training_pb2_grpc

SERVICE = define(
    "training", JOB_PREFIXES["training"],
    training_pb2, training_pb2_grpc, "TrainingService",
    TrainingServicer, run_training,
)
