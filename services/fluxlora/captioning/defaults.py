"""What the captioning service fills in for a CaptionSpec field left unset: one table, read by the
servicer (which writes the values into the queued spec), the job and the pure caption functions.
tests/unit/test_option_agreement.py holds it to the proto comments' "default: X". The captioning
model and the base model whose tokenizers count tokens come from the server's settings instead
(FLUXLORA_CAPTION_MODEL, FLUXLORA_BASE_MODEL)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionDefaults:
    captioner: str = "florence2"
    task: str = "<CAPTION>"
    batch_size: int = 8
    trigger_position: str = "start"
    max_new_tokens: int = 64
    style: str = "natural"


DEFAULTS = CaptionDefaults()
# The style of an editing (before/after pair) dataset left unset: instructions written from a
# description of each half (instructions.py); other datasets cannot ask for it.
PAIR_STYLE = "instruction"
