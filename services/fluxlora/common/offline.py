"""Hugging Face libraries in a server: no hub access at run time (models come from local
directories or the store) and no progress bars or advisories interleaved with the logs."""

from __future__ import annotations

import os


def configure_hf_offline() -> None:
    """Call before transformers/diffusers are imported; explicit environment settings win."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
