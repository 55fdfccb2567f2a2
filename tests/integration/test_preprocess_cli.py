"""`fluxlora preprocess` gives one output: the dataset report as tables a person reads (stdout, each
warning once, readable at 80 columns) or, with --json, the result as JSON for scripts; progress and
warnings go to stderr."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fluxlora_client import cli
from photo_corpus import write_bad_inputs
from support import run_main


def test_preprocess_prints_the_report_tables_at_80_columns_with_each_warning_once(cli_env, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    folder = write_bad_inputs(tmp_path / "upload")
    result = CliRunner().invoke(cli.app, ["preprocess", str(folder), "--base-size", "256", "--lora-type", "style"])
    assert result.exit_code == 0, result.output
    [job] = cli_env.list_jobs("preprocessing")
    dataset_id = cli_env.result(job).dataset_id

    report = result.stdout
    assert "{" not in report  # no JSON dump beside the tables
    assert f"dataset {dataset_id}: style LoRA, bucket 256 px (about 50 images recommended)" in report
    for heading in ("buckets", "rejected", "exact duplicates (not trained)", "near duplicates", "flagged"):
        assert heading in report
    assert max(len(line) for line in report.splitlines()) <= 80
    assert "…" not in report  # cells wrap, nothing is cut
    assert "zero.jpg" in report and "empty file (0 bytes)" in report
    assert "slip.zip" in report and "unsafe path" in report
    assert "good_1_copy.jpg" in report
    assert "256x192" in report  # the bucket histogram
    assert f"contact sheet datasets/{dataset_id}/contact_sheet.png" in report
    everything = " ".join((result.stdout + result.stderr).split())
    assert everything.count("Only 10 usable images for a style LoRA") == 1


def test_preprocess_json_is_the_only_thing_on_stdout(cli_env, tmp_path):
    folder = write_bad_inputs(tmp_path / "upload")
    result = CliRunner().invoke(
        cli.app, ["preprocess", str(folder / "album.zip"), "--base-size", "128", "--crop-mode", "pad",
                  "--blur-threshold", "0", "--json"],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["imageCount"] == 2 and printed["report"]["cropMode"] == "pad"
    assert "128x128" in printed["report"]["buckets"]


def test_a_failed_preprocess_names_the_users_own_folder(cli_env, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "my holiday photos"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, output = run_main(monkeypatch, capsys, "preprocess", str(folder), "--base-size", "128")
    assert code != 0
    text = " ".join(output.split())
    assert f"your folder {folder}" in text and "broken.jpg" in text
    assert "uploads/u-" not in text  # never the internal prefix
