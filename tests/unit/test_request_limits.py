"""Request limits as pure checks (fluxlora.common.limits), their settings, and the job runtime's cap
on watch streams."""

from __future__ import annotations

import threading

import pytest

from fluxlora.common.config import Settings
from fluxlora.common.limits import check_caption_lengths, check_text_length, check_train_steps
from fluxlora.common.storage import LocalStore
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.shared.errors import InvalidArgument, ResourceExhausted
from fluxlora_api.shared.files import check_upload_bytes
from fluxlora_api.v1 import preprocessing_pb2


def test_the_limits_are_settings_with_fluxlora_names(monkeypatch):
    defaults = Settings()
    assert defaults.max_upload_bytes == 32 * 1024**3 and defaults.max_caption_chars == 4000
    assert defaults.max_train_steps == 100_000 and defaults.max_watchers == 64
    for name, value in [("MAX_UPLOAD_BYTES", "1000"), ("MAX_CAPTION_CHARS", "10"), ("MAX_TRAIN_STEPS", "5"),
                        ("MAX_WATCHERS", "3")]:
        monkeypatch.setenv(f"FLUXLORA_{name}", value)
    settings = Settings()
    assert (settings.max_upload_bytes, settings.max_caption_chars, settings.max_train_steps,
            settings.max_watchers) == (1000, 10, 5, 3)
    monkeypatch.setenv("FLUXLORA_MAX_TRAIN_STEPS", "0")
    with pytest.raises(ValueError, match="max_train_steps"):
        Settings()


def test_an_upload_at_the_limit_passes_and_one_byte_more_is_resource_exhausted():
    assert check_upload_bytes([600, 400], 1000, "uploads/u-1/") == 1000
    with pytest.raises(ResourceExhausted) as err:
        check_upload_bytes([600, 401], 1000, "uploads/u-1/")
    message = err.value.message
    assert "uploads/u-1/" in message and "2 files" in message and "1001 bytes" in message
    assert "1000 bytes" in message and "FLUXLORA_MAX_UPLOAD_BYTES" in message


def test_captions_are_measured_as_stored_and_the_longest_are_named():
    check_caption_lengths({"a": "x" * 10, "b": "  " + "y " * 5 + "\n\n"}, 10, "captions")  # whitespace collapses
    with pytest.raises(InvalidArgument) as err:
        check_caption_lengths({"short": "ok", "long": "x" * 12, "longer": "x" * 15}, 10, "captions")
    message = err.value.message
    assert message.startswith("captions: 'longer' is 15 characters, 'long' is 12 characters")
    assert "'short'" not in message and "limit is 10 characters" in message and "FLUXLORA_MAX_CAPTION_CHARS" in message


def test_many_long_captions_are_counted_not_all_listed():
    with pytest.raises(InvalidArgument) as err:
        check_caption_lengths({f"img-{i:03d}": "x" * 20 for i in range(30)}, 10, "captions")
    assert "(25 more are over it too)" in err.value.message and "img-029" not in err.value.message


def test_find_and_replace_strings_and_train_steps_name_their_field():
    check_text_length("x" * 10, 10, "replace")
    with pytest.raises(InvalidArgument, match=r"^replace is 11 characters, over the limit of 10 "):
        check_text_length("x" * 11, 10, "replace")
    check_train_steps(500, 500)
    with pytest.raises(InvalidArgument) as err:
        check_train_steps(501, 500)
    assert err.value.message.startswith("spec.max_steps is 501, over the limit of 500 (FLUXLORA_MAX_TRAIN_STEPS)")


def test_the_runtime_refuses_watchers_beyond_its_limit_and_frees_a_slot_when_one_ends(tmp_path):
    gate = threading.Event()

    def blocked(ctx, spec):
        gate.wait(10)
        return preprocessing_pb2.PreprocessResult()

    runtime = JobRuntime("preprocessing", "pre", LocalStore(tmp_path / "store"), blocked, max_watchers=2)
    runtime.start()
    try:
        job = runtime.submit(preprocessing_pb2.PreprocessSpec(source_prefix="uploads/x/", base_size=512))
        first, second = runtime.watch(job.job_id), runtime.watch(job.job_id)
        next(first), next(second)
        assert runtime.watchers == 2
        with pytest.raises(ResourceExhausted) as err:
            next(runtime.watch(job.job_id))
        assert "the limit is 2" in err.value.message and "FLUXLORA_MAX_WATCHERS" in err.value.message
        first.close()  # what gRPC does to a stream whose client went away
        assert runtime.watchers == 1
        third = runtime.watch(job.job_id)
        next(third)
        gate.set()
        assert list(second)[-1].job.state == list(third)[-1].job.state
        assert runtime.watchers == 0
    finally:
        gate.set()
        runtime.shutdown()
