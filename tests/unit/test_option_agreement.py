"""Each option is declared once, in the proto: the CLI, the server's defaults and docs/api.md must
agree with it. These fail when a spec field has no CLI option, when the server's default differs
from the "default: X" its comment states, or when docs/api.md's option table is stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from google.protobuf import descriptor_pb2

from fluxlora.evaluation import validation
from fluxlora.preprocessing.manifest import (
    DEFAULT_BLUR_THRESHOLD,
    DEFAULT_MONOCHROME_THRESHOLD,
    DEFAULT_NEAR_DUPLICATE_DISTANCE,
)
from fluxlora.training.job import _NOT_CONFIG
from fluxlora.training.trainer.config import TrainConfig
from fluxlora_api.shared.options import default_value, flag_name, markdown_table, option_specs
from fluxlora_api.v1 import captioning_pb2, evaluation_pb2, preprocessing_pb2, training_pb2
from fluxlora_api.v1.field_docs import COMMENTS
from fluxlora_client import cli

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
# command -> (its spec message, the fields it takes as arguments or through an option of its own)
COMMANDS = {
    ("preprocess",): (preprocessing_pb2.PreprocessSpec, {"source_prefix": "PHOTOS (uploaded)"}),
    ("caption", "run"): (captioning_pb2.CaptionSpec, {"dataset_id": "DATASET_ID"}),
    ("train",): (training_pb2.TrainSpec, {"dataset_id": "DATASET_ID"}),
    ("evaluate",): (evaluation_pb2.GridSpec, {"run_id": "RUN_ID", "loras": "--lora"}),
    ("generate",): (evaluation_pb2.GenerateSpec, {"prompts": "PROMPT...", "loras": "--lora"}),
}
# Defaults the proto comment states in words because the server derives them.
DERIVED = {("TrainSpec", "alpha"): "rank", ("TrainSpec", "sample_prompts"): "the trigger word alone",
           ("TrainSpec", "resolution"): "the dataset's base size"}


def command(*path: str):
    found = typer.main.get_command(cli.app)
    for name in path:
        found = found.commands[name]
    return found


def flags(*path: str) -> set[str]:
    return {opt for param in command(*path).params for opt in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_spec_field_is_an_option_of_its_command(path):
    message, taken_otherwise = COMMANDS[path]
    have = flags(*path)
    missing = [f.name for f in message.DESCRIPTOR.fields
               if f.name not in taken_otherwise and flag_name(f.name) not in have]
    assert not missing, f"fluxlora {' '.join(path)} lacks options for {message.__name__} fields {missing}"
    for special in {v for v in taken_otherwise.values() if v.startswith("--")}:
        assert special in have


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_spec_field_has_a_comment_the_help_and_docs_show(path):
    message, _ = COMMANDS[path]
    comments = COMMENTS[message.DESCRIPTOR.full_name]
    assert [f.name for f in message.DESCRIPTOR.fields if not comments.get(f.name)] == []


def test_train_config_and_train_spec_hold_the_same_options_with_the_same_defaults():
    spec_fields = set(training_pb2.TrainSpec.DESCRIPTOR.fields_by_name)
    config_fields = set(TrainConfig.model_fields)
    assert config_fields - spec_fields == set(), "TrainConfig options the API cannot set"
    assert spec_fields - config_fields <= _NOT_CONFIG, "TrainSpec fields the trainer does not know"
    comments = COMMENTS["fluxlora.v1.TrainSpec"]
    wrong = {}
    for name, info in TrainConfig.model_fields.items():
        stated = default_value(comments[name])
        actual = info.get_default(call_default_factory=True)
        if ("TrainSpec", name) in DERIVED:
            assert stated == DERIVED["TrainSpec", name]
        elif stated != actual:
            wrong[name] = (stated, actual)
    assert wrong == {}, "proto comment 'default:' vs TrainConfig default"


def test_preprocessing_and_captioning_defaults_are_one_table_each_that_agrees_with_the_comments():
    import dataclasses

    from fluxlora.captioning.defaults import DEFAULTS as CAPTION
    from fluxlora.preprocessing.defaults import COLOURS
    from fluxlora.preprocessing.defaults import DEFAULTS as PREPROCESS
    from fluxlora.preprocessing.job import options_from_spec

    # Defaults the proto comments state in words because the server derives them.
    derived = {"min_side": "max(64, base_size / 4)"}
    for message, table in ((preprocessing_pb2.PreprocessSpec, PREPROCESS), (captioning_pb2.CaptionSpec, CAPTION)):
        comments = COMMENTS[message.DESCRIPTOR.full_name]
        stated = {name: default_value(text) for name, text in comments.items() if name}
        stated = {name: value for name, value in stated.items() if value is not None}
        for name, words in derived.items():
            if name in stated:
                assert stated.pop(name) == words
        assert stated == dataclasses.asdict(table), f"{message.__name__}: proto comment 'default:' vs {table}"
    # and the service reads its table: an empty spec gets these options
    options = options_from_spec(preprocessing_pb2.PreprocessSpec())
    assert (options.base_size, options.mode, options.lora_type, options.background, options.blur_threshold) == (
        PREPROCESS.base_size, PREPROCESS.crop_mode, PREPROCESS.lora_type, COLOURS[PREPROCESS.background],
        PREPROCESS.blur_threshold)


def test_other_services_defaults_match_the_comments():
    grid, generate = COMMENTS["fluxlora.v1.GridSpec"], COMMENTS["fluxlora.v1.GenerateSpec"]
    assert default_value(grid["strengths"]) == list(validation.DEFAULT_STRENGTHS)
    assert default_value(grid["seed"]) == validation.DEFAULT_SEED == default_value(generate["seed"])
    assert default_value(grid["steps"]) == validation.DEFAULT_STEPS == default_value(generate["steps"])
    assert default_value(generate["guidance"]) == validation.DEFAULT_GUIDANCE
    preprocess = COMMENTS["fluxlora.v1.PreprocessSpec"]
    assert default_value(preprocess["blur_threshold"]) == DEFAULT_BLUR_THRESHOLD
    assert default_value(preprocess["near_duplicate_distance"]) == DEFAULT_NEAR_DUPLICATE_DISTANCE
    assert default_value(preprocess["monochrome_threshold"]) == DEFAULT_MONOCHROME_THRESHOLD


def test_docs_option_tables_are_the_ones_generated_from_the_protos():
    text = DOCS.read_text()
    for message, _ in COMMANDS.values():
        descriptor = message.DESCRIPTOR
        section = re.search(rf"<!-- options:{re.escape(descriptor.full_name)} -->\n(.*?)<!-- /options -->", text, re.S)
        assert section, f"docs/api.md has no option table for {descriptor.full_name}"
        proto = descriptor_pb2.DescriptorProto()
        descriptor.CopyToProto(proto)
        enums = {}
        for field in descriptor.fields:
            if field.enum_type is not None:
                enums[field.enum_type.full_name] = descriptor_pb2.EnumDescriptorProto()
                field.enum_type.CopyToProto(enums[field.enum_type.full_name])
        expected = markdown_table(proto, COMMENTS[descriptor.full_name], enums)
        assert section[1] == expected, f"docs/api.md's {descriptor.name} table is stale: run python protos/generate.py"


def test_every_option_the_planner_may_suggest_is_a_train_flag():
    # The planner's alternatives change TrainConfig fields (memory/planner.py): all of them are flags.
    have = flags("train")
    assert {flag_name(f) for f in TrainConfig.model_fields} <= have
    for suggested in ("precision", "gradient_checkpointing", "base_quantization", "blocks_to_swap", "resolution"):
        assert flag_name(suggested) in have


def test_option_specs_follow_the_descriptor():
    specs = {s.field: s for s in option_specs(preprocessing_pb2.PreprocessSpec.DESCRIPTOR)}
    assert specs["crop_mode"].choices == ("square", "bucket", "subject", "pad")
    assert specs["blur_threshold"].has_presence and not specs["base_size"].has_presence
    assert specs["base_size"].default == "1024" and specs["base_size"].flag == "--base-size"
    assert specs["min_side"].default == "max(64, base_size / 4)"
    train = {s.field: s for s in option_specs(training_pb2.TrainSpec.DESCRIPTOR)}
    assert train["target_modules"].repeated and train["learning_rate"].default == "1e-4"
    assert all(len(s.help) <= 260 for s in train.values())
