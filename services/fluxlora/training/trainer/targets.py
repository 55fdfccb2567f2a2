"""Which transformer layers get LoRA layers: the presets, and how a target_modules list is matched.

An entry of target_modules is either
- a module name, matched as peft matches names: the name itself or any module whose name ends in
  "." + name ("to_q" is every attention's to_q). This is the form runs always had; or
- a regular expression (an entry with a character of `\\^$*+?{}[]()|`), which must match the
  whole module name, e.g. `transformer_blocks\\.\\d+\\.ff_context\\.net\\.2`.

A list of plain names goes to peft unchanged, so runs recorded with names (run.json) rebuild the
very adapter they trained. A list with a pattern goes to peft as one regular expression that is
the union of its entries, each name turned into the pattern of peft's name rule.

Presets (FLUX.1's FluxTransformer2DModel module names; N = any block index):
- attention (the default): `to_q`, `to_k`, `to_v`, `to_out.0`; these names occur only in the
  blocks' attention: the image stream's q/k/v/out in double blocks, q/k/v in single blocks.
- all_linear: every linear layer of the attention and the MLPs of both streams, in every block:
  double blocks' attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out},
  ff.net.{0.proj,2} (image MLP) and ff_context.net.{0.proj,2} (text MLP); single blocks'
  attn.{to_q,to_k,to_v}, proj_mlp and proj_out. Not included: the modulation (AdaLN) linear
  layers norm1.linear / norm1_context.linear / norm.linear, which kohya sd-scripts also leaves
  out of FLUX.1 LoRAs by default, and every layer outside the blocks (embedders, the final
  norm_out.linear and proj_out). Each can still be named explicitly.
Families with other module names (FLUX.2) bring their own list for each preset
(Family.target_presets, see models/families/flux2.py), put in place by for_family.
"""

from __future__ import annotations

import re

_PATTERN_CHARS = frozenset("\\^$*+?{}[]()|")
_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."

ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
ALL_LINEAR_TARGETS = [
    _DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    _DOUBLE + r"(ff|ff_context)\.net\.(0\.proj|2)",
    _SINGLE + r"(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)",
]
TARGET_PRESETS = {"attention": ATTENTION_TARGETS, "all_linear": ALL_LINEAR_TARGETS}
# What the attention+MLP preset was before it became patterns: its "proj_out" also matched the
# model's final layer and it missed the text stream's MLP. Runs recorded with it still resume.
LEGACY_ATTENTION_AND_MLP_TARGETS = [*ATTENTION_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                    "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out"]


def for_family(entries: list[str], family_presets: dict[str, list[str]] | None) -> list[str]:
    """The entries to train on a model family whose module names differ from FLUX.1's: a preset
    (as written above) becomes that family's own list for it (Family.target_presets); anything
    else is kept, so a run that names modules gets exactly those."""
    for name, preset in TARGET_PRESETS.items():
        if family_presets and name in family_presets and list(entries) == preset:
            return list(family_presets[name])
    return list(entries)


def is_pattern(entry: str) -> bool:
    return any(char in _PATTERN_CHARS for char in entry)


def check_entry(entry: str) -> None:
    """Raise ValueError for an empty entry or a pattern that does not compile."""
    if not entry.strip():
        raise ValueError("target_modules must not contain empty names")
    if is_pattern(entry):
        try:
            re.compile(entry)
        except re.error as exc:
            raise ValueError(f"target_modules entry {entry!r} is not a valid regular expression: {exc}") from None


def peft_target_modules(entries: list[str]) -> list[str] | str:
    """What to give peft's LoraConfig(target_modules=...) for these entries."""
    if not any(is_pattern(entry) for entry in entries):
        return list(entries)
    return "|".join(f"(?:{_as_pattern(entry)})" for entry in entries)


def matches(entries: list[str], module_name: str) -> bool:
    """Whether a module (its name within the transformer) is targeted, as peft decides it."""
    target = peft_target_modules(entries)
    if isinstance(target, str):
        return re.fullmatch(target, module_name) is not None
    return module_name in target or any(module_name.endswith("." + name) for name in target)


def _as_pattern(entry: str) -> str:
    return entry if is_pattern(entry) else r"(?:.*\.)?" + re.escape(entry)
