"""The `fluxlora` command line against real gRPC servers on a local-directory store, found the way
a user's shell finds them: FLUXLORA_STORE and FLUXLORA_<SERVICE>_ADDR."""

from __future__ import annotations

import json

from support import fluxlora, run_main


def test_preprocess_prints_the_dataset_and_the_job_can_be_listed_and_shown(cli_env, photos):
    result = fluxlora("preprocess", str(photos), "--base-size", "64", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    dataset_id = printed["datasetId"]
    assert dataset_id.startswith("ds-") and printed["imageCount"] > 0
    assert cli_env.store.exists(f"datasets/{dataset_id}/manifest.json")

    [job] = cli_env.list_jobs("preprocessing")
    listed = fluxlora("jobs", "list", "preprocessing")
    assert listed.exit_code == 0, listed.output
    assert job.job_id in listed.stdout and "SUCCEEDED" in listed.stdout

    shown = fluxlora("jobs", "show", job.job_id)
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert record["jobId"] == job.job_id
    assert record["state"] == "JOB_STATE_SUCCEEDED"
    assert record["service"] == "preprocessing"


def test_a_bad_request_exits_non_zero_with_the_status_and_no_traceback(cli_env, monkeypatch, capsys):
    code, output = run_main(monkeypatch, capsys, "caption", "ds-missing", "--trigger", "x")
    assert code != 0
    assert "NOT_FOUND" in output and "ds-missing" in output
    assert "Traceback" not in output


def test_an_unknown_job_id_exits_non_zero_with_a_clean_message(cli_env, monkeypatch, capsys):
    code, output = run_main(monkeypatch, capsys, "jobs", "show", "nope-123")
    assert code != 0
    assert "INVALID_ARGUMENT" in output and "nope-123" in output
    assert "Traceback" not in output


def test_an_unknown_service_exits_non_zero_with_a_clean_message(cli_env, monkeypatch, capsys):
    code, output = run_main(monkeypatch, capsys, "jobs", "list", "trainer")
    assert code != 0
    assert "INVALID_ARGUMENT" in output and "trainer" in output
    assert "Traceback" not in output


def test_a_failed_job_names_the_file_verbatim(cli_env, monkeypatch, capsys, tmp_path):
    folder = tmp_path / "not-photos"
    folder.mkdir()
    (folder / "[draft]photo.jpg").write_text("a text file, not a JPEG")
    code, output = run_main(monkeypatch, capsys, "preprocess", str(folder), "--base-size", "64")
    assert code != 0
    assert "FAILED_PRECONDITION" in output and "[draft]photo.jpg" in output
    assert "Traceback" not in output


def test_misconfigured_credentials_exit_non_zero_with_a_clean_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FLUXLORA_STORE", "s3://")  # never read by the client: only the servers use a store
    monkeypatch.setenv("FLUXLORA_AUTH_TOKEN", "a-token")
    monkeypatch.setenv("FLUXLORA_AUTH_TOKEN_FILE", str(tmp_path / "token"))
    code, output = run_main(monkeypatch, capsys, "jobs", "list", "training")
    assert code != 0
    assert "INVALID_ARGUMENT" in output and "FLUXLORA_AUTH_TOKEN_FILE" in output and "bucket" not in output
    assert "Traceback" not in output


def test_the_entry_point_exits_zero_on_success(cli_env, monkeypatch, capsys):
    code, output = run_main(monkeypatch, capsys, "jobs", "list", "training")
    assert code == 0, output


def test_models_write_tiny_writes_both_models(tmp_path):
    out = tmp_path / "models"
    result = fluxlora("models", "write-tiny", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "tiny-flux" / "model_index.json").is_file()
    assert (out / "tiny-florence2" / "config.json").is_file()
    printed = "".join(result.stdout.split())  # rich wraps long paths at the console width
    assert str(out / "tiny-flux") in printed and str(out / "tiny-florence2") in printed
