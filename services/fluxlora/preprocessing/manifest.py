"""Preprocessing options and the manifest written next to the processed images."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fluxlora.preprocessing.buckets import validate_base_size

Channel = Annotated[int, Field(ge=0, le=255)]
Box = tuple[int, int, int, int]
Flag = Literal["upscaled", "blurry", "near_duplicate", "extreme_aspect", "monochrome", "control_upscaled"]

MANIFEST_VERSION = 2

# The defaults below are calibrated on real photographs and their hard cases (bench/gate.py, which
# prints precision and recall for each check; tests/unit/test_preprocess_calibration.py holds them).
#
# quality.blur_score of the training image (detail in its least sharp direction). On the bench,
# sharp photos score 26 and up (most in the hundreds), a 2.5 px defocus or a 13 px camera shake
# at 512 px 1 to 13, the real motion-blurred photo 3.
DEFAULT_BLUR_THRESHOLD = 18.0
# Hamming distance out of 64 bits on both the DCT and the gradient hash (and close chroma,
# quality.near_duplicate_clusters). Re-encodes and resizes land at 0-4, burst frames, a stereo
# pair (DCT 4, gradient 13), overexposed and captioned copies at 2-13; different real photos at
# 18+ on the DCT hash. The largest value whose precision stays >= 0.995 on the bench.
DEFAULT_NEAR_DUPLICATE_DISTANCE = 13
# quality.colour_spread of the training image: grey photos score 0, toned ones (sepia,
# cyanotype, nearly desaturated) up to about 8.5, colour photos 9.5 and more (one colour photo
# of mostly sky scored 5).
DEFAULT_MONOCHROME_THRESHOLD = 9.0


def default_min_side(base_size: int) -> int:
    """Shortest side accepted when the caller sets none: a quarter of base, at least 64 px.

    Up to 2x upscaling only softens a photo (it is accepted with a warning); past 4x the model
    learns the upscaler's blur as part of the subject, so such photos hurt more than they help.
    """
    return max(64, base_size // 4)


class PreprocessOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base_size: int = 1024
    mode: Literal["bucket", "square", "subject", "pad"] = "bucket"
    lora_type: Literal["concrete", "style"] = "concrete"
    background: tuple[Channel, Channel, Channel] = (255, 255, 255)
    # None means default_min_side(base_size); resolved on construction so manifests (and the
    # dataset fingerprint) always carry the floor that was actually applied.
    min_side: int | None = Field(default=None, ge=1)
    blur_threshold: float = Field(default=DEFAULT_BLUR_THRESHOLD, ge=0)
    """Images whose blur score is below this are flagged "blurry"; 0 turns the check off."""
    near_duplicate_distance: int = Field(default=DEFAULT_NEAR_DUPLICATE_DISTANCE, ge=-1, le=32)
    """Largest perceptual-hash distance that counts as a near duplicate; -1 turns the check off."""
    monochrome_threshold: float = Field(default=DEFAULT_MONOCHROME_THRESHOLD, ge=0)
    """Images whose colour spread is below this are flagged "monochrome"; 0 turns the check off."""

    @field_validator("base_size")
    @classmethod
    def _base_size(cls, value: int) -> int:
        return validate_base_size(value)

    @model_validator(mode="before")
    @classmethod
    def _resolve_min_side(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("min_side") is None:
            base = data.get("base_size", 1024)
            if isinstance(base, int) and not isinstance(base, bool) and base > 0:
                data = {**data, "min_side": default_min_side(base)}
        return data


class ImageEntry(BaseModel):
    stem: str
    file_name: str
    source_key: str
    source_format: str
    source_mode: str
    original_size: tuple[int, int]
    """Width x height after EXIF orientation: the frame crop_box refers to."""
    crop_box: Box
    """The part of the original that was kept (the whole frame in "pad" mode)."""
    size: tuple[int, int]
    bucket: str
    sha256: str
    """Of the source file's bytes."""
    pixel_sha256: str
    """Of the training PNG written, which identifies its pixels (fixed encoder settings): equal
    for one photo saved in two lossless ways. Also the stored image's checksum."""
    phash: str = ""
    """64-bit DCT perceptual hash (imagehash.phash) of the training image, hex."""
    dhash: str = ""
    """64-bit gradient hash (imagehash.dhash) of the training image, hex."""
    colour: str = ""
    """Mean RGB of each quarter of the training image, hex (near duplicates share it closely)."""
    blur_score: float = 0.0
    """Detail at training size: mean of the top quarter of tile Laplacian variances; low is blurry."""
    colour_spread: float = 0.0
    """How far the colours stray from one tint (quality.colour_spread): 0 grey, low toned, 10+ colour."""
    pad_box: Box | None = None
    """"pad" mode: where the photo sits inside the output; the rest is filled with pad_color."""
    pad_color: tuple[int, int, int] | None = None
    near_duplicate_group: int | None = None
    """Index into Manifest.near_duplicate_groups when this image has near duplicates."""
    control_source_key: str | None = None
    """Editing pairs: the uploaded control (before) image of this target."""
    control_file_name: str | None = None
    """Editing pairs: the control image cropped as this one, "control/<stem>.png" (stored under
    keys.dataset_controls)."""
    flags: list[Flag] = []
    """Machine-readable summary of the warnings: what the report and the contact sheet mark."""
    warnings: list[str] = []


class RejectedFile(BaseModel):
    source_key: str
    reason: str


class DuplicateFile(BaseModel):
    source_key: str
    duplicate_of: str
    """Source key of the image that was kept."""
    stem: str
    """Stem of the kept image."""
    match: Literal["file bytes", "pixels"]


class NearDuplicateGroup(BaseModel):
    """Kept images that look alike; all of them are trained, the report asks the user to choose."""

    stems: list[str]
    source_keys: list[str]
    max_distance: int
    """Largest perceptual-hash distance between two linked members."""


class Manifest(BaseModel):
    manifest_version: int = MANIFEST_VERSION
    dataset_fingerprint: str
    options: PreprocessOptions
    file_count: int = 0
    """Inputs considered (members of an archive count one by one; a refused archive counts once)."""
    image_count: int
    rejected_count: int
    duplicate_count: int
    flagged_count: int = 0
    buckets: dict[str, int]
    paired: bool = False
    """An editing dataset: every image has a control (before) image (ImageEntry.control_*)."""
    warnings: list[str]
    images: list[ImageEntry]
    rejected: list[RejectedFile]
    duplicates: list[DuplicateFile]
    near_duplicate_groups: list[NearDuplicateGroup] = []
