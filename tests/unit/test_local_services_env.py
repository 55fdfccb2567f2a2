"""`fluxlora up` / `fluxlora demo` run training jobs in a child process (a crash in training fails the
job, not the server), unless the caller chose another runner."""

from fluxlora_client.local import service_environment


def test_training_defaults_to_the_process_runner_and_the_others_do_not():
    assert service_environment("training", {"PATH": "/bin"})["FLUXLORA_RUNNER"] == "process"
    for name in ("preprocessing", "captioning", "evaluation"):
        assert "FLUXLORA_RUNNER" not in service_environment(name, {"PATH": "/bin"})


def test_a_runner_the_caller_set_wins():
    assert service_environment("training", {"FLUXLORA_RUNNER": "local"})["FLUXLORA_RUNNER"] == "local"
