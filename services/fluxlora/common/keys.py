"""Object-store key layout (one bucket), in one place."""

from __future__ import annotations


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/"


def dataset_manifest(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/manifest.json"


def dataset_images(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/images/"


def dataset_controls(dataset_id: str) -> str:
    """The control (before) images of an editing dataset, <stem>.png as their targets in images/."""
    return f"datasets/{dataset_id}/control/"


def dataset_captions(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/captions.json"


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"


def run_info(run_id: str) -> str:
    return f"runs/{run_id}/run.json"


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"runs/{run_id}/checkpoints/step-{step:06d}/"


def grid_prefix(grid_id: str) -> str:
    return f"grids/{grid_id}/"


def generation_prefix(generation_id: str) -> str:
    return f"generations/{generation_id}/"


def encoding_cache(key: str) -> str:
    """Encoded training images and captions (fluxlora.training.trainer.encoding_cache), shared by runs."""
    return f"cache/encodings/{key}.safetensors"
