"""Preprocessing options and the manifest written next to the processed images."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fluxlora.preprocessing.buckets import validate_base_size

Channel = Annotated[int, Field(ge=0, le=255)]

MANIFEST_VERSION = 1


def default_min_side(base_size: int) -> int:
    """Shortest side accepted when the caller sets none: a quarter of base, at least 64 px.

    Up to 2x upscaling only softens a photo (it is accepted with a warning); past 4x the model
    learns the upscaler's blur as part of the subject, so such photos hurt more than they help.
    """
    return max(64, base_size // 4)


class PreprocessOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base_size: int = 1024
    mode: Literal["bucket", "square"] = "bucket"
    lora_type: Literal["concrete", "style"] = "concrete"
    background: tuple[Channel, Channel, Channel] = (255, 255, 255)
    # None means default_min_side(base_size); resolved on construction so manifests (and the
    # dataset fingerprint) always carry the floor that was actually applied.
    min_side: int | None = Field(default=None, ge=1)

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
    crop_box: tuple[int, int, int, int]
    size: tuple[int, int]
    bucket: str
    sha256: str
    """Of the source file's bytes."""
    pixel_sha256: str
    """Of the decoded RGB pixels: equal for the same photo saved in two lossless ways."""
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


class Manifest(BaseModel):
    manifest_version: int = MANIFEST_VERSION
    dataset_fingerprint: str
    options: PreprocessOptions
    image_count: int
    rejected_count: int
    duplicate_count: int
    buckets: dict[str, int]
    warnings: list[str]
    images: list[ImageEntry]
    rejected: list[RejectedFile]
    duplicates: list[DuplicateFile]
