"""Docker Compose files: validated by Debian's docker-compose (`config` checks them against the
Compose schema and interpolates variables) and held to the deployment's promises: MinIO with a
volume and a health check, a one-shot bucket init, four hardened services configured from the
environment, GPU reservations for the GPU services, and a CPU-only override that removes them."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from deploy_tools import COMPOSE, tool

FLUXLORA = ("preprocessing", "captioning", "training", "evaluation")
GPU_SERVICES = ("captioning", "training", "evaluation")
NVIDIA_GPU = [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


class Reset:
    """Compose's `!reset` tag: drop what the files before this one set."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset(
    loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else None))


def load(name: str) -> dict:
    return yaml.load((COMPOSE / name).read_text(), Loader=ComposeLoader)


def merge(base, override):
    """Compose's merge of two files, for what the override uses: mappings merge key by key, a
    `!reset` removes the key, anything else replaces."""
    if isinstance(override, Reset):
        return None
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge(base.get(key), value)
            if result is None and isinstance(value, Reset):
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    return override


def cpu_only() -> dict:
    return merge(load("compose.yaml"), load("compose.cpu-only.yaml"))


def compose_config(path, env_file=COMPOSE / "env.example") -> subprocess.CompletedProcess:
    """`docker-compose config` in a clean environment (the operator's shell must not leak in)."""
    command = [tool("docker-compose"), "--project-directory", str(COMPOSE), "-f", str(path)]
    if env_file:
        command += ["--env-file", str(env_file)]
    return subprocess.run(command + ["config"], capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")})


def test_docker_compose_accepts_the_gpu_file():
    result = compose_config(COMPOSE / "compose.yaml")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) - {"prometheus"} == {"minio", "minio-init", *FLUXLORA}
    assert config["services"]["training"]["environment"]["FLUXLORA_S3_SECRET_KEY"] == (
        "change-me-to-another-long-random-secret")


def test_docker_compose_accepts_the_gpu_file_with_the_cpu_only_override_applied(tmp_path):
    merged = tmp_path / "compose.merged.yaml"
    merged.write_text(yaml.safe_dump(cpu_only(), sort_keys=False))
    result = compose_config(merged)
    assert result.returncode == 0, result.stderr


def test_missing_credentials_stop_compose_with_a_message_naming_the_variable(tmp_path):
    env = tmp_path / "partial.env"
    env.write_text("MINIO_ROOT_USER=admin\nMINIO_ROOT_PASSWORD=secret-secret\n")
    result = compose_config(COMPOSE / "compose.yaml", env_file=env)
    assert result.returncode != 0
    assert "FLUXLORA_S3_ACCESS_KEY" in result.stderr and "env.example" in result.stderr


def test_minio_keeps_its_data_in_a_volume_and_reports_health():
    minio = load("compose.yaml")["services"]["minio"]
    assert "minio-data:/data" in minio["volumes"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert minio["command"][:2] == ["server", "/data"]


def test_the_bucket_init_runs_once_after_minio_is_healthy_and_makes_the_services_key():
    init = load("compose.yaml")["services"]["minio-init"]
    assert init["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert init["restart"] == "no"
    script = init["command"][0]
    assert "mc mb --ignore-existing" in script and "mc admin user add" in script


@pytest.mark.parametrize("name", FLUXLORA)
def test_each_service_is_hardened_health_checked_configured_from_the_environment_and_waits_for_the_bucket(name):
    service = load("compose.yaml")["services"][name]
    assert service["command"] == ["serve", name]
    assert service["depends_on"] == {"minio-init": {"condition": "service_completed_successfully"}}
    assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "fluxlora.server.healthcheck"]
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    env = service["environment"]
    assert env["FLUXLORA_STORE"].startswith("s3://") and env["FLUXLORA_S3_ENDPOINT"] == "minio:9000"
    assert env["FLUXLORA_S3_SECRET_KEY"].startswith("${FLUXLORA_S3_SECRET_KEY:?")  # never a literal secret
    assert env["FLUXLORA_HOST"] == "0.0.0.0"
    port = env["FLUXLORA_PORT"]
    assert service["ports"] == [f"{port}:{port}"]
    assert "model-cache:/cache" in service["volumes"]


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_services_reserve_an_nvidia_gpu_and_use_the_cuda_image(name):
    service = load("compose.yaml")["services"][name]
    assert service["deploy"]["resources"]["reservations"]["devices"] == NVIDIA_GPU
    assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert service["environment"]["FLUXLORA_DEVICE"] == "cuda"


def test_preprocessing_reserves_no_gpu_and_uses_the_cpu_image():
    service = load("compose.yaml")["services"]["preprocessing"]
    assert "deploy" not in service and service["build"]["dockerfile"] == "docker/Dockerfile.cpu"


def test_the_cpu_only_override_removes_every_gpu_reservation_and_keeps_everything_else():
    base, merged = load("compose.yaml"), cpu_only()
    for name in GPU_SERVICES:
        assert "deploy" not in merged["services"][name]
        assert merged["services"][name]["environment"]["FLUXLORA_DEVICE"] == "cpu"
        assert merged["services"][name]["environment"]["FLUXLORA_STORE"] == base["services"][name]["environment"][
            "FLUXLORA_STORE"]
    assert merged["services"]["preprocessing"] == base["services"]["preprocessing"]
    assert merged["volumes"] == base["volumes"]


def test_every_image_is_pinned():
    for name, service in load("compose.yaml")["services"].items():
        image = service["image"]
        assert not image.endswith(":latest") and ":" in image, f"{name}: {image}"
        if "build" not in service:  # third-party images: by digest too
            assert "@sha256:" in image, f"{name}: pin {image} by digest"
