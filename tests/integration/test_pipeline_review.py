"""`fluxlora pipeline --review`: the pipeline stops after captioning with the review page written and
prints the commands to import the edits, approve and continue; running exactly those trains on the
version the person approved. Without approval nothing trains."""

from __future__ import annotations

import json
import shlex

import pytest

from fluxlora.captioning.cleaning import count_trigger
from fluxlora_client import FluxloraClientError, PipelineOptions, continue_pipeline
from support import fluxlora, run_main

TRIGGER = "fluxone"


def commands_in(output: str) -> list[list[str]]:
    """The fluxlora command lines printed, as argument lists (comments dropped)."""
    found = []
    for line in output.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["fluxlora"]:
            found.append(words[1:])
    return found


def test_a_review_stop_then_the_printed_commands_train_on_the_approved_captions(
        cli_env, photos, tiny_models, tmp_path, monkeypatch, capsys):
    client = cli_env
    monkeypatch.chdir(tmp_path)  # where the review page's Download edits button would save
    stopped = fluxlora("pipeline", str(photos), "--trigger", TRIGGER, "--base-model", str(tiny_models["flux"]),
                       "--caption-model", str(tiny_models["florence2"]), "--base-size", "64", "--resolution", "64",
                       "--max-steps", "2", "--checkpoint-every", "2", "--out", "out", "--review")
    assert stopped.exit_code == 0, stopped.output
    assert (tmp_path / "out" / "review.html").exists() and "out/review.html" in stopped.output
    assert client.list_jobs("training") == []
    import_review, approve, resume = commands_in(stopped.output)
    assert resume[:2] == ["pipeline", "--dataset"]
    dataset_id = resume[2]
    assert "caption version 1 is a draft" in stopped.output
    assert import_review == ["caption", "import-review", dataset_id, f"{dataset_id}-v1-edits.json"]
    assert approve == ["caption", "approve", dataset_id]

    # continuing before anyone approved is refused, saying what to do
    code, output = run_main(monkeypatch, capsys, *resume)
    assert code != 0 and "FAILED_PRECONDITION" in output and "no approved captions" in output
    assert client.list_jobs("training") == []

    # the reviewer fixes one caption on the page and saves the edits where the command expects them
    stem = client.captions.list(dataset_id).entries[0].stem
    (tmp_path / import_review[-1]).write_text(json.dumps({
        "format": "fluxlora-caption-edits/1", "dataset_id": dataset_id, "base_version": 1,
        "captions": {stem: f"{TRIGGER}, a reviewed bottle"}}))
    for command in (import_review, approve):
        done = fluxlora(*command)
        assert done.exit_code == 0, done.output
    trained = fluxlora(*resume)
    assert trained.exit_code == 0, trained.output

    [job] = client.list_jobs("training")
    assert client.spec(job).caption_version == 3  # 1 auto, 2 the edit, 3 its approval
    assert "captions trained on" in trained.output and "version 3, approved by" in trained.output
    entries = {e.stem: e.caption for e in client.captions.list(dataset_id, 3).entries}
    assert entries[stem] == f"{TRIGGER}, a reviewed bottle"
    assert all(count_trigger(caption, TRIGGER) == 1 for caption in entries.values())
    assert (tmp_path / "out" / "grid" / "grid.png").exists()

    # an edit after the approval is not trained on silently
    client.captions.edit(dataset_id, {stem: f"{TRIGGER}, edited again"})
    with pytest.raises(FluxloraClientError) as err:
        continue_pipeline(client, dataset_id, PipelineOptions(trigger_word=TRIGGER))
    assert err.value.code == "FAILED_PRECONDITION" and "newer than the approved version 3" in err.value.message
