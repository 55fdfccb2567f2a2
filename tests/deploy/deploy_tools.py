"""Paths of the deployment files and the external validators the deploy tests use.

The validators are real tools, found on PATH or in .ci/tools/<name>/bin (.ci/install-deploy-tools, run by .ci/run):
Debian's docker-compose (compose files), kubectl's built-in kustomize (overlays), hadolint
(Dockerfiles). Without one, its tests are skipped; with FLUXLORA_REQUIRE_DEPLOY_TOOLS=1 (CI) a
missing tool fails them instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = ROOT / "deploy" / "compose"
K8S = ROOT / "deploy" / "k8s"
CI_TOOLS = ROOT / ".ci" / "tools"  # .ci/install-deploy-tools puts PyPI tools in <name>/bin


def tool(name: str) -> str:
    """The path of an external tool, or a skip (a failure in CI) naming how to get it."""
    found = shutil.which(name, path=f"{CI_TOOLS / name / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if found:
        return found
    message = f"{name} not found: `bash .ci/run` installs it (see .ci/install-deploy-tools)"
    if os.environ.get("FLUXLORA_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)
