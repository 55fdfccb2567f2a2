"""What the preprocessing service fills in for a PreprocessSpec field left unset: one table, read
by the servicer and options_from_spec (job.py). tests/unit/test_option_agreement.py holds it to the
proto comments' "default: X". min_side's default is derived from base_size (manifest.default_min_side);
the quality thresholds are calibrated in manifest.py and named here."""

from __future__ import annotations

from dataclasses import dataclass

from fluxlora.preprocessing.manifest import (
    DEFAULT_BLUR_THRESHOLD,
    DEFAULT_MONOCHROME_THRESHOLD,
    DEFAULT_NEAR_DUPLICATE_DISTANCE,
)

# The background colours a default may name, as RGB.
COLOURS = {"white": (255, 255, 255)}


@dataclass(frozen=True)
class PreprocessDefaults:
    base_size: int = 1024
    crop_mode: str = "bucket"
    lora_type: str = "concrete"
    background: str = "white"
    blur_threshold: float = DEFAULT_BLUR_THRESHOLD
    near_duplicate_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE
    monochrome_threshold: float = DEFAULT_MONOCHROME_THRESHOLD


DEFAULTS = PreprocessDefaults()
