"""`fluxlora caption ...` against real servers on a local store: auto-caption (the old invocation
still works), then list, edit, replace, review page, approve, history and export."""

from __future__ import annotations

import json

from support import fluxlora, run_main


def test_caption_then_review_approve_and_export_from_the_command_line(cli_env, photos, tiny_models, tmp_path,
                                                                      monkeypatch, capsys):
    client = cli_env
    dataset_id = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64))).dataset_id

    # the one-stage invocation of before: `fluxlora caption DATASET --trigger WORD`
    done = fluxlora("caption", dataset_id, "--trigger", "fluxone", "--model", str(tiny_models["florence2"]),
                    "--remove", "zebra")
    assert done.exit_code == 0, done.output
    assert "'zebra' is in none of the captions" in done.output
    stems = [e.stem for e in client.captions.list(dataset_id).entries]

    listed = fluxlora("caption", "list", dataset_id)
    assert listed.exit_code == 0, listed.output
    assert all(stem in listed.output for stem in stems) and "version 1 (auto)" in listed.output

    edited = fluxlora("caption", "edit", dataset_id, stems[0], "fluxone, a green bottle", "--comment", "colour")
    assert edited.exit_code == 0, edited.output
    assert "1 caption(s) changed -> version 2" in edited.output

    dry = fluxlora("caption", "replace", dataset_id, "green", "blue", "--dry-run")
    assert "replace (dry run): nothing changed" in dry.output and stems[0] in dry.output
    replaced = fluxlora("caption", "replace", dataset_id, "green", "blue")
    assert "1 caption(s) changed -> version 3" in replaced.output

    page = tmp_path / "review.html"
    reviewed = fluxlora("caption", "review", dataset_id, "--out", str(page), "--image-size", "32")
    assert reviewed.exit_code == 0 and page.exists() and "import-review" in reviewed.output
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps({"format": "fluxlora-caption-edits/1", "dataset_id": dataset_id, "base_version": 3,
                                 "captions": {stems[1]: "a bottle without the trigger"}}))
    imported = fluxlora("caption", "import-review", dataset_id, str(edits))
    assert "version 4" in imported.output and "0 times" in imported.output

    code, output = run_main(monkeypatch, capsys, "caption", "approve", dataset_id)
    assert code != 0 and "FAILED_PRECONDITION" in output and f"{stems[1]} (0 times)" in output
    approved = fluxlora("caption", "approve", dataset_id, "--fix-triggers")
    assert approved.exit_code == 0, approved.output
    assert "-> version 5 (approved)" in approved.output

    history = fluxlora("caption", "history", dataset_id)
    for kind in ("auto", "edit", "replace", "approve"):
        assert kind in history.output
    assert "approved 5" in history.output

    out = tmp_path / "kohya"
    exported = fluxlora("caption", "export", dataset_id, "--out", str(out))
    assert exported.exit_code == 0, exported.output
    assert (out / f"{stems[0]}.txt").read_text() == "fluxone, a blue bottle\n"
    assert (out / f"{stems[1]}.txt").read_text() == "fluxone, a bottle without the trigger\n"


def test_caption_errors_exit_non_zero_with_the_status(cli_env, monkeypatch, capsys):
    code, output = run_main(monkeypatch, capsys, "caption", "list", "ds-missing")
    assert code != 0 and "NOT_FOUND" in output and "ds-missing" in output and "Traceback" not in output
