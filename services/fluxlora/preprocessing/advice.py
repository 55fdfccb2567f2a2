"""Dataset-level advice: whether the set is big and varied enough for the LoRA type, and what to do.

Per-image problems stay on the images (manifest.ImageEntry.warnings); these are about the set.
"""

from __future__ import annotations

from collections.abc import Sequence

from fluxlora.preprocessing.manifest import (
    DuplicateFile,
    ImageEntry,
    NearDuplicateGroup,
    PreprocessOptions,
    RejectedFile,
)

# (warn below, recommended, what to add): rules of thumb from LoRA training practice.
_DATASET_SIZE: dict[str, tuple[int, int, str]] = {
    "concrete": (
        15,
        30,
        (
            "add sharp, unoccluded photos of the subject from varied angles, distances and "
            "backgrounds, in different lighting"
        ),
    ),
    "style": (
        50,
        50,
        "add more images in the style, with varied subjects, compositions and colours",
    ),
}
# A style LoRA over-learns any single picture that makes up more than this share of the set.
STYLE_CLUSTER_SHARE = 0.2


def recommended_images(lora_type: str) -> int:
    """About how many images a LoRA of this type wants."""
    return _DATASET_SIZE[lora_type][1]


def dataset_warnings(
    images: Sequence[ImageEntry],
    rejected: Sequence[RejectedFile],
    duplicates: Sequence[DuplicateFile],
    options: PreprocessOptions,
    near_duplicate_groups: Sequence[NearDuplicateGroup] = (),
) -> list[str]:
    """Dataset-level advice for the user; per-image problems stay on the images."""
    warnings: list[str] = []
    count = len(images)
    warn_below, recommended, what_to_add = _DATASET_SIZE[options.lora_type]
    if count == 0:
        warnings.append(f"No usable images: nothing to train on. {what_to_add.capitalize()}.")
    elif count < warn_below:
        warnings.append(
            f"Only {count} usable image{'s' if count != 1 else ''} for a {options.lora_type} "
            f"LoRA; about {recommended}{'+' if options.lora_type == 'style' else ''} work best. "
            f"{what_to_add.capitalize()}."
        )
    warnings.extend(_uniformity_warnings(count, near_duplicate_groups, options, what_to_add))
    if rejected:
        warnings.append(f"{len(rejected)} file(s) rejected; see `rejected` for the reasons.")
    if duplicates:
        warnings.append(f"{len(duplicates)} exact duplicate(s) skipped; see `duplicates`.")
    if near_duplicate_groups:
        members = sum(len(group.stems) for group in near_duplicate_groups)
        warnings.append(
            f"{len(near_duplicate_groups)} group(s) of near duplicates ({members} images), listed in "
            "`near_duplicate_groups`: all are trained, but near-identical shots teach the model less than "
            "varied ones; keep the best of each group."
        )
    blurry = [entry.source_key for entry in images if "blurry" in entry.flags]
    if blurry:
        warnings.append(
            f"{len(blurry)} image(s) look blurry or low on detail (blur score under "
            f"{options.blur_threshold:g}): {some(blurry)}; replace them with sharp photos."
        )
    monochrome = [entry.source_key for entry in images if "monochrome" in entry.flags]
    if monochrome:
        warnings.append(
            f"{len(monochrome)} of {count} images are greyscale or toned monochrome (sepia-like): {some(monochrome)}. "
            "A LoRA trained on them learns monochrome, and its images come out without colour; use colour "
            "photos unless that look is the point."
        )
    upscaled = sum(1 for entry in images if "upscaled" in entry.flags)
    if upscaled and upscaled * 2 >= count:
        warnings.append(
            f"{upscaled} of {count} images had to be upscaled to reach {options.base_size} px; "
            "higher-resolution photos, or a smaller base size, would train sharper."
        )
    return warnings


def _uniformity_warnings(
    count: int, groups: Sequence[NearDuplicateGroup], options: PreprocessOptions, what_to_add: str
) -> list[str]:
    warnings: list[str] = []
    distinct = count - sum(len(group.stems) - 1 for group in groups)
    if count >= 4 and distinct * 2 < count:
        warnings.append(
            f"Too uniform: {count} images but only {distinct} distinct shots (the rest are near duplicates); "
            f"a {options.lora_type} LoRA learns from variety. {what_to_add.capitalize()}."
        )
    if options.lora_type == "style" and groups:
        largest = max(groups, key=lambda group: len(group.stems))
        share = len(largest.stems) / count
        if share > STYLE_CLUSTER_SHARE:
            warnings.append(
                f"One cluster of near-identical images holds {len(largest.stems)} of {count} ({share:.0%}) of this "
                f"style dataset ({some(largest.source_keys)}): the LoRA would learn that picture rather than the "
                "style. Keep one or two of them and add different images in the style."
            )
    return warnings


def some(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
