"""The Docker images, checked without a Docker engine: the Dockerfiles parsed (pinned bases,
multi-stage, non-root, gRPC health check, the entrypoint), linted with hadolint, their pinned
requirement lists held against pyproject.toml, and the CPU image's promise kept: the preprocessing
server runs a real job with every package outside docker/requirements/cpu.txt unimportable."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib

import pytest
from deploy_tools import DOCKER, ROOT, tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
GPU_ONLY = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "sentencepiece"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def stages(path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def resolved_bases(path) -> list[str]:
    """Every FROM's image with ARG defaults substituted."""
    defaults = {}
    for name, args in instructions(path):
        if name == "FROM":
            break
        if name == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            defaults[key] = value
    bases = []
    for name, args in instructions(path):
        if name == "FROM":
            image = args.split()[0]
            bases.append(re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image))
    return bases


def freeze_module():
    spec = importlib.util.spec_from_file_location("freeze", DOCKER / "requirements" / "freeze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_closure() -> set[str]:
    """What the CPU image installs, as resolved in this environment: pyproject's dependencies
    without the GPU stack, and everything they need (freeze.py's rule for cpu.txt)."""
    freeze = freeze_module()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return set(freeze.closure([d for d in deps if canonicalize_name(Requirement(d).name) not in freeze.NOT_FOR_CPU]))


def pins(name: str) -> dict[str, str]:
    lines = (DOCKER / "requirements" / name).read_text().splitlines()
    return {canonicalize_name(line.split("==")[0]): line.split("==")[1]
            for line in lines if line and not line.startswith("#")}


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_bases_are_pinned_by_version_tag_and_digest(kind):
    for image in resolved_bases(DOCKERFILES[kind]):
        name, _, tag = image.split("@")[0].partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{image}: pin a version tag"
        assert DIGEST.search(image), f"{image}: pin the digest too"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_multi_stage_non_root_with_a_grpc_health_check_and_the_fluxlora_entrypoint(kind):
    build, final = stages(DOCKERFILES[kind])[0], stages(DOCKERFILES[kind])[-1]
    assert len(stages(DOCKERFILES[kind])) >= 2
    assert any(n == "RUN" and "pip install" in a for n, a in build)
    assert not any(n == "RUN" and "pip install" in a for n, a in final), "the final stage only copies the venv"
    assert any(n == "COPY" and a.startswith("--from=build /opt/fluxlora") for n, a in final)
    (user,) = [a for n, a in final if n == "USER"]
    assert user.split(":")[0] not in ("0", "root"), "the services run as a non-root user"
    assert [n for n, _ in final][-3:] == ["HEALTHCHECK", "ENTRYPOINT", "CMD"]  # USER set before them
    (health,) = [a for n, a in final if n == "HEALTHCHECK"]
    assert 'CMD ["python", "-m", "fluxlora.server.healthcheck"]' in health
    (entrypoint,) = [a for n, a in final if n == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["fluxlora"]
    (cmd,) = [a for n, a in final if n == "CMD"]
    assert json.loads(cmd)[0] == "serve"


def test_the_cpu_image_serves_preprocessing_without_torch():
    text = DOCKERFILES["cpu"].read_text()
    assert "requirements/cpu.txt" in text and "pip install --no-deps /src" in text
    assert "torch" not in "\n".join(a for _, a in instructions(DOCKERFILES["cpu"]))
    assert json.loads([a for n, a in stages(DOCKERFILES["cpu"])[-1] if n == "CMD"][0]) == ["serve", "preprocessing"]
    assert not GPU_ONLY & set(pins("cpu.txt")), "cpu.txt must not carry the GPU stack"


def test_the_gpu_image_installs_the_pinned_torch_from_a_cuda_index():
    project_torch = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                     if Requirement(d).name == "torch"][0]
    args = dict(a.split("=", 1) for n, a in instructions(DOCKERFILES["gpu"]) if n == "ARG" and "=" in a)
    assert Requirement(project_torch).specifier.contains(args["TORCH_VERSION"])
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    assert any(n == "RUN" and '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in a
               for n, a in instructions(DOCKERFILES["gpu"]))


def test_the_requirement_lists_satisfy_pyproject_and_agree_with_each_other():
    gpu, cpu = pins("gpu.txt"), pins("cpu.txt")
    own = freeze_module().OWN  # this repository's distributions, installed from /src
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name in own:
            continue
        assert name in gpu, f"gpu.txt lacks {name}: run docker/requirements/freeze.py"
        assert req.specifier.contains(gpu[name], prereleases=True), f"gpu.txt {name}=={gpu[name]} vs {dep}"
    assert {n: v for n, v in gpu.items() if n in cpu} == cpu, "cpu.txt pins must equal gpu.txt's"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    cpu_roots = {canonicalize_name(Requirement(d).name) for d in deps} - freeze_module().NOT_FOR_CPU - own
    assert cpu_roots <= set(cpu), f"cpu.txt lacks {cpu_roots - set(cpu)}: run docker/requirements/freeze.py"


def test_dockerignore_lets_in_exactly_what_the_dockerfiles_copy():
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*", "start from nothing, so no secrets, venvs or outputs reach the build context"
    allowed = {r[1:].rstrip("/").removesuffix("/*.txt") for r in rules if r.startswith("!")}
    for path in DOCKERFILES.values():
        for name, args in instructions(path):
            if name == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    top = source.rstrip("/")
                    assert any(top == a or top.startswith(a + "/") for a in allowed), f"{source} is dockerignored"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_passes(kind):
    result = subprocess.run([tool("hadolint"), str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Runs in a fresh interpreter: only the distributions in cpu.txt (and fluxlora itself) may load.
CPU_ONLY_RUN = r"""
import importlib.abc, importlib.metadata, json, sys
allowed = set(json.loads(sys.argv[1]))
owners = importlib.metadata.packages_distributions()
blocked = {m for m, dists in owners.items()
           if not any(d.lower().replace("_", "-") in allowed for d in dists) and m not in ("fluxlora", "fluxlora_api",
           "fluxlora_client", "_distutils_hack", "pkg_resources", "setuptools", "_pytest", "pytest")}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not in the CPU image (docker/requirements/cpu.txt)")

sys.meta_path.insert(0, Block())
from pathlib import Path
from fluxlora_client import cli  # the image's entrypoint module
from fluxlora.common.config import Settings
from fluxlora.server.bootstrap import start_server
from fluxlora.common.storage import open_store
from fluxlora.server import healthcheck
from fluxlora_client import FluxloraClient
from PIL import Image

work = Path(sys.argv[2])
photos = work / "photos"
photos.mkdir()
for i, color in enumerate(["red", "green", "blue"]):
    Image.new("RGB", (640, 480), color).save(photos / f"p{i}.jpg")
# The store as deployed: an S3 bucket through the minio client.
settings = Settings(store="s3://cpu-image", s3_endpoint=sys.argv[3], s3_access_key="test", s3_secret_key="test",
                    cache_dir=work / "cache")
store = open_store(settings)
server = start_server("preprocessing", settings, store=store, port=0)
assert healthcheck.main(["--address", server.address]) == 0
client = FluxloraClient(preprocessing=server.address)
job = client.wait(client.preprocess(client.upload_photos(photos), base_size=256))
print(json.dumps({"images": client.result(job).image_count,
                  "gpu_stack_loaded": sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)}))
client.close()
server.stop(grace=1.0)
"""


def test_the_preprocessing_server_runs_a_job_with_only_the_cpu_images_packages(tmp_path, moto_endpoint):
    allowed = sorted(cpu_closure())
    assert not GPU_ONLY & set(allowed)
    run = subprocess.run([sys.executable, "-c", CPU_ONLY_RUN, json.dumps(allowed), str(tmp_path), moto_endpoint],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome == {"images": 3, "gpu_stack_loaded": []}
