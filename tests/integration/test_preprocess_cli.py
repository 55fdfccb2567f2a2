"""`fluxlora preprocess` prints the dataset report as tables a person reads (on stderr, with the
progress bars) and the result as JSON on stdout, for scripts."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fluxlora_client import cli
from photo_corpus import write_bad_inputs


def test_preprocess_prints_the_report_tables_and_the_result_json(cli_env, tmp_path):
    folder = write_bad_inputs(tmp_path / "upload")
    result = CliRunner().invoke(cli.app, ["preprocess", str(folder), "--base-size", "256", "--lora-type", "style"])
    assert result.exit_code == 0, result.output

    printed = json.loads(result.stdout)
    dataset_id = printed["datasetId"]
    assert printed["report"]["rejectedCount"] == 6

    report = result.stderr
    assert f"dataset {dataset_id}: style LoRA, bucket 256 px (about 50 images recommended)" in report
    for heading in ("buckets", "rejected", "exact duplicates (not trained)", "near duplicates", "flagged"):
        assert heading in report
    assert "zero.jpg" in report and "empty file (0 bytes)" in report
    assert "slip.zip" in report and "unsafe path" in report
    assert "good_1.jpg (good_1)" in report and "good_1_copy.jpg" in report
    assert "good_2, good_2_reencoded" in report
    assert "256x192" in report  # the bucket histogram
    assert "warning Only 10 usable images for a style LoRA" in report
    assert f"contact sheet datasets/{dataset_id}/contact_sheet.png" in report


def test_preprocess_takes_a_zip_and_the_crop_options(cli_env, tmp_path):
    folder = write_bad_inputs(tmp_path / "upload")
    result = CliRunner().invoke(
        cli.app, ["preprocess", str(folder / "album.zip"), "--base-size", "128", "--crop-mode", "pad",
                  "--blur-threshold", "0"],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["imageCount"] == 2 and printed["report"]["cropMode"] == "pad"
    assert "128x128" in result.stderr
