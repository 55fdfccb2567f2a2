"""The CLI's spec options: derived from the proto, sent only when given, readable at 80 columns,
and a bad value is a usage error naming its flag. A fake TrainingService records the requests."""

from __future__ import annotations

import grpc
import pytest
import typer
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from typer.testing import CliRunner

from fluxlora_api.shared.options import option_specs
from fluxlora_api.v1 import captioning_pb2, evaluation_pb2, preprocessing_pb2, training_pb2, training_pb2_grpc
from fluxlora_client import cli
from fluxlora_client.errors import FluxloraClientError
from fluxlora_client.spec_options import SpecCommand, spec_options
from support import fake_server

PLAN = training_pb2.TrainingPlan(total_gib=30, target_gib=24, fits=False, mode="bf16", alternatives=[
    training_pb2.PlanAlternative(changes={"gradient_checkpointing": "true", "blocks_to_swap": "12"}, total_gib=20),
    training_pb2.PlanAlternative(changes={"base_quantization": "fp8", "precision": "bf16", "resolution": "512"},
                                 total_gib=14),
])


class FakeTraining(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self):
        self.requests = []

    def SubmitTraining(self, request, context):
        self.requests.append(request)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recorded by the fake server")

    def PlanTraining(self, request, context):
        self.requests.append(request)
        return PLAN


@pytest.fixture
def training(monkeypatch, tmp_path):
    fake = FakeTraining()
    with fake_server(training_pb2_grpc.add_TrainingServiceServicer_to_server, fake) as address:
        monkeypatch.setenv("FLUXLORA_TRAINING_ADDR", address)
        monkeypatch.setenv("FLUXLORA_STORE", str(tmp_path / "store"))
        yield fake


def invoke(*args: str, columns: int = 200):
    """The CLI through typer's runner; a FluxloraClientError is what cli.main prints as one line."""
    result = CliRunner().invoke(cli.app, list(args), env={"COLUMNS": str(columns)})
    assert result.exception is None or isinstance(result.exception, SystemExit | FluxloraClientError), result.exception
    return result


def test_only_the_options_given_are_sent(training):
    result = invoke("train", "ds-1", "--max-steps", "10", "--no-gradient-checkpointing", "--seed", "0",
                    "--sample-prompts", "a, b", "--sample-prompts", "c", "--lr-warmup-steps", "5")
    assert "recorded by the fake server" in str(result.exception)
    [request] = training.requests
    sent = {f.name for f, _ in request.spec.ListFields()}
    assert sent == {"dataset_id", "max_steps", "gradient_checkpointing", "seed", "sample_prompts", "lr_warmup_steps"}
    assert request.spec.HasField("seed") and request.spec.seed == 0
    assert request.spec.HasField("gradient_checkpointing") and not request.spec.gradient_checkpointing
    assert list(request.spec.sample_prompts) == ["a, b", "c"]


def test_nothing_given_sends_a_bare_spec(training):
    invoke("train", "ds-1")
    [request] = training.requests
    assert [f.name for f, _ in request.spec.ListFields()] == ["dataset_id"]


def test_every_option_the_plan_suggests_is_a_flag_that_works(training):
    shown = invoke("train", "ds-1", "--plan", "--resolution", "1024")
    assert shown.exit_code == 0, shown.output
    assert training.requests[0].spec.resolution == 1024 and not training.requests[0].spec.HasField("seed")
    for alternative in PLAN.alternatives:
        flags = cli.plan_flags(dict(alternative.changes))
        assert " ".join(flags) in shown.output
        again = invoke("train", "ds-1", "--plan", *[part for flag in flags for part in flag.split(" ", 1)])
        assert again.exit_code == 0, again.output
        spec = training.requests[-1].spec
        for name, value in alternative.changes.items():
            assert str(getattr(spec, name)).lower() == value


@pytest.mark.parametrize("args, flag", [
    (("train", "ds-1", "--max-steps", "many"), "--max-steps"),
    (("train", "ds-1", "--seed", "99999999999999999999"), "--seed"),
    (("evaluate", "trn-1", "--strengths", "0,x"), "--strengths"),
    (("generate", "a bottle", "--lora", "trn-1:abc@0.8"), "--lora"),
    (("generate", "a bottle", "--lora", "trn-1:100@strong"), "--lora"),
    (("caption", "ds-1", "--trigger-position", "middle", "--max-new-tokens", "x"), "--max-new-tokens"),
])
def test_a_bad_value_is_a_one_line_error_naming_the_flag(training, args, flag):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if "Invalid value" in line]
    assert flag in line and "Traceback" not in result.output


def test_an_unknown_choice_names_the_choices(tmp_path):
    result = invoke("preprocess", str(tmp_path), "--crop-mode", "circle")
    assert result.exit_code == 2 and "--crop-mode" in result.output and "bucket" in result.output


@pytest.mark.parametrize("path, message", [
    (("train",), training_pb2.TrainSpec), (("preprocess",), preprocessing_pb2.PreprocessSpec),
    (("evaluate",), evaluation_pb2.GridSpec), (("generate",), evaluation_pb2.GenerateSpec),
    (("caption", "run"), captioning_pb2.CaptionSpec),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_help_reads_at_80_columns(path, message):
    result = invoke(*path, "--help", columns=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    words = set(result.output.replace("/", " ").replace(",", " ").split())
    exclude = {"dataset_id", "source_prefix", "run_id", "prompts", "loras"}
    assert {s.flag for s in option_specs(message.DESCRIPTOR, exclude=exclude)} <= words


def _synthetic_message():
    """A spec message that is not in fluxlora's protos, standing for a field added tomorrow."""
    file = descriptor_pb2.FileDescriptorProto(name="synthetic_options.proto", package="synthetic", syntax="proto3")
    mode = file.enum_type.add(name="Mode")
    mode.value.add(name="MODE_UNSPECIFIED", number=0)
    mode.value.add(name="MODE_FAST", number=1)
    spec = file.message_type.add(name="KnobSpec")
    F = descriptor_pb2.FieldDescriptorProto
    spec.field.add(name="new_knob", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    spec.field.add(name="mode", number=2, type=F.TYPE_ENUM, type_name=".synthetic.Mode", label=F.LABEL_OPTIONAL)
    spec.field.add(name="tags", number=3, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("synthetic.KnobSpec"))


def test_a_new_field_becomes_an_option_without_being_written_again():
    message = _synthetic_message()
    seen = {}
    app = typer.Typer()

    @app.command(cls=SpecCommand)
    @spec_options(message)
    def knobs(spec: dict) -> None:
        seen.update(spec)

    @app.command()
    def other() -> None:  # two commands, so `knobs` is a sub-command as in fluxlora
        pass

    result = CliRunner().invoke(app, ["knobs", "--new-knob", "3", "--mode", "fast", "--tags", "x"])
    assert result.exit_code == 0, result.output
    assert seen == {"new_knob": 3, "mode": "fast", "tags": ["x"]}
    from fluxlora_api.shared.options import build_message

    assert build_message(message, seen) == message(new_knob=3, mode=1, tags=["x"])
    helped = CliRunner().invoke(app, ["knobs", "--help"]).output
    assert "--new-knob" in helped and "--mode" in helped and "fast" in helped
