from fluxlora.evaluation.job import run_evaluation
from fluxlora.evaluation.servicer import EvaluationServicer
from fluxlora.jobs.definition import define
from fluxlora_api.shared.ports import JOB_PREFIXES
from fluxlora_api.v1 import evaluation_pb2, evaluation_pb2_grpc

SERVICE = define(
    "evaluation", JOB_PREFIXES["evaluation"],
    evaluation_pb2, evaluation_pb2_grpc, "EvaluationService",
    EvaluationServicer, run_evaluation,
)
