"""Finding a service's definition by name: imported on demand, so the preprocessing server never
imports torch."""

from __future__ import annotations

import importlib

from fluxlora.jobs.definition import ServiceDefinition
from fluxlora_api.shared.ports import SERVICES


def load_definition(name: str) -> ServiceDefinition:
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
    return importlib.import_module(f"fluxlora.{name}.service").SERVICE
