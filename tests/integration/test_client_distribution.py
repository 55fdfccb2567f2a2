"""A program that installs only the client distribution (fluxlora-client, with the contract
fluxlora-api) gets the SDK and the CLI without torch, and runs the whole pipeline against servers
running elsewhere, holding no store credentials: uploads and downloads go through the services.

The client's environment is a fresh virtual environment built from this repository
(`pip install ./protos ./clients/python`); the servers run in this test's process on the local
store and on S3 (moto), where only they hold the S3 keys."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

from fluxlora.common.storage import LocalStore
from support import make_s3_store, services_and_client

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "peft", "numpy", "minio", "fluxlora")


@pytest.fixture(scope="module")
def client_python(tmp_path_factory) -> Path:
    """Python of a new virtual environment holding the client distribution and nothing of the servers."""
    root = tmp_path_factory.mktemp("client-venv")
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(REPO / "protos"), str(REPO / "clients" / "python")],
                   check=True, env=_without_project_paths(os.environ))
    return python


def _without_project_paths(env) -> dict[str, str]:
    """This process's environment less what would let the client see the servers' code or keys."""
    return {k: v for k, v in env.items()
            if k != "PYTHONPATH" and not k.startswith(("FLUXLORA_S3_", "AWS_", "VIRTUAL_ENV"))}


def _run(python: Path, code: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          env={**_without_project_paths(os.environ), **(env or {})}, cwd=cwd)


def test_the_client_installs_without_torch_or_any_server_code(client_python):
    for module in HEAVY:
        probe = _run(client_python, f"import {module}")
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module
    names = _run(client_python, "import importlib.metadata as m; print(sorted(d.name for d in m.distributions()))")
    assert "fluxlora-client" in names.stdout and "torch" not in names.stdout.lower()


def test_the_client_cli_runs_and_has_no_server_commands(client_python):
    fluxlora = client_python.parent / "fluxlora"
    result = subprocess.run([fluxlora, "--help"], capture_output=True, text=True, timeout=60,
                            env={**_without_project_paths(os.environ), "COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    for command in ("preprocess", "caption", "train", "evaluate", "pipeline", "jobs"):
        assert command in result.stdout
    for server_only in (" serve ", " worker ", " demo "):
        assert server_only not in result.stdout


PIPELINE = """
    import json, sys
    from pathlib import Path
    from fluxlora_client import FluxloraClient, PipelineOptions, run_pipeline

    photos, flux, florence2, out = sys.argv[1:5]
    options = PipelineOptions(
        trigger_word="fluxone", base_model=flux, caption_model=florence2, base_size=64,
        remove_phrases=["bottle"], caption={"max_new_tokens": 8},
        train={"resolution": 64, "max_steps": 4, "checkpoint_every": 2, "sample_every": 2, "rank": 4,
               "sample_steps": 2},
        grid={"steps": 2},
    )
    with FluxloraClient.from_env() as client:
        result = run_pipeline(client, Path(photos), options, download_to=Path(out))
    print(json.dumps({"dataset": result.dataset_id, "run": result.run_id,
                      "files": sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())}))
"""


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_client_without_store_credentials_runs_the_whole_pipeline(backend, client_python, photos, tiny_models,
                                                                    tmp_path, request):
    store = (LocalStore(tmp_path / "store") if backend == "local"
             else make_s3_store(request.getfixturevalue("moto_endpoint")))
    with services_and_client(store, tmp_path) as sdk:
        env = {f"FLUXLORA_{name.upper()}_ADDR": address for name, address in sdk.addresses.items()}
        out = tmp_path / "out"
        script = PIPELINE.replace("sys.argv[1:5]", repr([str(photos), str(tiny_models["flux"]),
                                                       str(tiny_models["florence2"]), str(out)]))
        result = _run(client_python, script, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout.strip().splitlines()[-1])
    files = summary["files"]
    assert any(f.endswith(".safetensors") for f in files), files
    assert any(f.endswith("grid.png") for f in files), files
    assert any(f.endswith("manifest.json") for f in files), files
    # The photos reached the servers' store through the services, each exactly once.
    uploaded = [info.key.rsplit("/", 1)[-1] for info in store.list("uploads/")]
    for photo in (p.name for p in Path(photos).iterdir() if p.is_file()):
        assert uploaded.count(photo) == 1, (photo, uploaded)

