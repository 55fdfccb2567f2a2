"""Size limits on what one request may ask of a server, checked at the servicers' edge.

Each refusal names the field, the value, the limit and the FLUXLORA_* setting that raises it, so
the person who hits one can tell a mistake (a pasted file as a caption, max_steps with a zero too
many) from a limit their deployment should raise. Values beyond a fixed request limit are
INVALID_ARGUMENT (like FLUXLORA_GRID_MAX_CELLS); bytes beyond what a server takes in are
RESOURCE_EXHAUSTED, as gRPC answers an oversized message.

Limits fixed in code rather than settings live beside what they protect:
fluxlora.preprocessing.images.MAX_IMAGE_PIXELS (decompression bombs), ArchiveLimits in
fluxlora.domain.archives (zip bombs), MAX_SIDE / MAX_STEPS in fluxlora.evaluation.validation.
"""

from __future__ import annotations

from collections.abc import Mapping

from fluxlora_api.shared.errors import InvalidArgument
from fluxlora_api.shared.files import check_upload_bytes, human_bytes

__all__ = ["check_upload_bytes", "human_bytes", "check_caption_lengths", "check_text_length", "check_train_steps",
           "normalised_caption"]


def normalised_caption(text: str) -> str:
    """A caption as it is stored: whitespace runs collapsed (what counts against the limit)."""
    return " ".join((text or "").split())


def check_caption_lengths(captions: Mapping[str, str], limit: int, field: str) -> None:
    """INVALID_ARGUMENT naming the longest captions when any, as stored, is longer than `limit` characters."""
    lengths = {stem: len(normalised_caption(text)) for stem, text in captions.items()}
    over = sorted((stem for stem, n in lengths.items() if n > limit), key=lambda s: (-lengths[s], s))
    if over:
        shown = ", ".join(f"{stem!r} is {lengths[stem]} characters" for stem in over[:5])
        more = f" ({len(over) - 5} more are over it too)" if len(over) > 5 else ""
        raise InvalidArgument(
            f"{field}: {shown}{more}; the limit is {limit} characters (FLUXLORA_MAX_CAPTION_CHARS). FLUX's "
            "text encoders read at most 512 tokens (about 2,000 characters): shorten the caption, or raise "
            "FLUXLORA_MAX_CAPTION_CHARS on the captioning server"
        )


def check_text_length(value: str, limit: int, field: str) -> None:
    """INVALID_ARGUMENT when one text field (a find or replace string) is longer than `limit` characters."""
    if len(value) > limit:
        raise InvalidArgument(
            f"{field} is {len(value)} characters, over the limit of {limit} (FLUXLORA_MAX_CAPTION_CHARS): "
            "shorten it or raise FLUXLORA_MAX_CAPTION_CHARS on the captioning server"
        )


def check_train_steps(max_steps: int, limit: int) -> None:
    """INVALID_ARGUMENT when a run asks for more optimiser steps than the server allows."""
    if max_steps > limit:
        raise InvalidArgument(
            f"spec.max_steps is {max_steps}, over the limit of {limit} (FLUXLORA_MAX_TRAIN_STEPS): a FLUX LoRA "
            "converges in a few thousand steps, so lower max_steps or raise FLUXLORA_MAX_TRAIN_STEPS on the "
            "training server"
        )
