"""Picking the best (checkpoint, strength) of a grid from score tables. Pure: no torch, no store.

Two kinds of evidence, each optional:

Convergence. Each checkpoint's flow-matching loss on the run's own images, at fixed noise levels
with fixed noise (see heldout.py), and the base model's loss on the same probe. The converged step
is the first checkpoint whose loss is within `tolerance` (10%) of the run's total improvement
(base loss minus best loss) from the best loss at or after it: training on from there buys less
than a tenth of what the run achieved. A tolerance relative to the loss itself would not work:
the flow-matching loss has a large floor (~1 for noise vs. data) that a LoRA moves by a few percent.

Fidelity and flexibility (when an image-text model is configured). For every cell, fidelity is the
mean cosine similarity of its image embedding to the training images' embeddings (does it look
like the subject?), flexibility the cosine similarity to the prompt with the trigger word removed
(does it still follow the rest of the prompt, or has the LoRA over-fitted into copying the
training photos?).

The rule (RULE below, also written into report.json):
1. Rows: checkpoints at or after the converged step (every row when convergence was skipped).
2. Columns: strengths above 0 (strength 0 is the base model, the reference, never the answer); a grid
   with none above 0 falls back to its negative strengths (the LoRA applied inverted), then to 0,
   and the reason says so.
3. With image-text scores: fidelity and flexibility are each min-max normalised over all cells of
   the grid (strength 0 included) so the two similarities share a scale, and
   score = (1 - w) * fidelity + w * flexibility with w = 0.5. The eligible cell with the highest
   score wins; near-ties go to the earlier checkpoint, then the lower strength (less over-fitting
   risk for the same result).
4. Without them: the converged checkpoint (later ones only risk over-fitting for no loss gain) at
   the strength nearest 1.0, the weight the LoRA was trained at; when 1.0 is not in the grid the
   reason says so and names the strength picked instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

CONVERGENCE_TOLERANCE = 0.1
FLEXIBILITY_WEIGHT = 0.5
TIE = 1e-9

RULE = (
    "rows: checkpoints at or after the converged step (first checkpoint within 10% of the run's total "
    "held-out loss improvement of the best later loss); columns: strengths > 0; with image-text scores, "
    "fidelity and flexibility min-max normalised over the grid, score = 0.5*fidelity + 0.5*flexibility, "
    "highest wins, ties to the earlier checkpoint then the lower strength; without them, the converged "
    "checkpoint at the strength nearest 1.0, the weight the LoRA was trained at (when 1.0 is not in the grid, "
    "the reason says so); a grid with no strength above 0 falls back to its negative strengths, then to 0"
)

Table = Sequence[Sequence[float]]


@dataclass(frozen=True)
class Convergence:
    step: int  # the converged checkpoint
    reference_loss: float  # the base model's loss (or the first checkpoint's when no base)
    best_loss: float
    improved: bool  # some checkpoint beat the reference


@dataclass(frozen=True)
class Recommendation:
    row: int
    col: int
    step: int
    strength: float
    basis: str  # "convergence+image-text", "convergence", "image-text" or "default"
    reason: str
    scores: list[list[float]] | None = None  # the combined score of every cell, when computed


def convergence(
    steps: Sequence[int], losses: Sequence[float], base_loss: float | None = None,
    tolerance: float = CONVERGENCE_TOLERANCE,
) -> Convergence:
    """Where the held-out loss stops improving; steps ascending, one loss per step."""
    if not steps or len(steps) != len(losses):
        raise ValueError(f"need one loss per checkpoint: {len(steps)} steps, {len(losses)} losses")
    if list(steps) != sorted(steps):
        raise ValueError(f"checkpoint steps must ascend: {list(steps)}")
    bad = [s for s, v in zip(steps, losses, strict=True) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"held-out loss is not finite at step(s) {bad}")
    reference = losses[0] if base_loss is None else base_loss
    best = min(losses)
    total = reference - best
    if total <= 0:
        return Convergence(steps[0], reference, best, improved=False)
    for i, step in enumerate(steps):
        if losses[i] - min(losses[i:]) <= tolerance * total:
            return Convergence(step, reference, best, improved=True)
    raise AssertionError("unreachable: the last checkpoint is always within tolerance of itself")


def normalise(table: Table) -> list[list[float]]:
    """Min-max over every cell to [0, 1]; a constant table becomes all zeros."""
    values = [v for row in table for v in row]
    low, high = min(values), max(values)
    span = high - low
    return [[(v - low) / span if span > 0 else 0.0 for v in row] for row in table]


def recommend(
    steps: Sequence[int],
    strengths: Sequence[float],
    *,
    converged_step: int | None = None,
    fidelity: Table | None = None,
    flexibility: Table | None = None,
    flexibility_weight: float = FLEXIBILITY_WEIGHT,
) -> Recommendation:
    """The recommended cell of a steps x strengths grid under RULE.

    fidelity and flexibility are tables [row][col] matching steps x strengths, both or neither.
    """
    if not steps or not strengths:
        raise ValueError("the grid needs at least one checkpoint and one strength")
    if (fidelity is None) != (flexibility is None):
        raise ValueError("pass both fidelity and flexibility tables, or neither")
    for name, table in (("fidelity", fidelity), ("flexibility", flexibility)):
        if table is not None and (len(table) != len(steps) or any(len(r) != len(strengths) for r in table)):
            raise ValueError(f"{name} table must be {len(steps)} rows x {len(strengths)} columns")

    rows = [r for r, s in enumerate(steps) if converged_step is None or s >= converged_step]
    rows = rows or list(range(len(steps)))
    cols = eligible_columns(strengths)

    if fidelity is not None and flexibility is not None:
        f, x = normalise(fidelity), normalise(flexibility)
        w = flexibility_weight
        scores = [[(1 - w) * f[r][c] + w * x[r][c] for c in range(len(strengths))] for r in range(len(steps))]
        best_score = max(scores[r][c] for r in rows for c in cols)
        # Rows ascend in step; within a row prefer the lowest strength: the first near-tie wins.
        row, col = next(
            (r, c) for r in rows for c in sorted(cols, key=lambda c: strengths[c])
            if scores[r][c] >= best_score - TIE
        )
        basis = "convergence+image-text" if converged_step is not None else "image-text"
        reason = (
            f"highest combined score {scores[row][col]:.3f} (fidelity {fidelity[row][col]:.3f}, "
            f"flexibility {flexibility[row][col]:.3f})"
            + (f" among checkpoints from the converged step {converged_step}" if converged_step is not None else "")
            + ("" if strengths[col] > 0 else "; " + strength_reason(strengths, col))
        )
        return Recommendation(row, col, steps[row], strengths[col], basis, reason, scores)

    col = min(cols, key=lambda c: (abs(strengths[c] - 1.0), strengths[c]))
    if converged_step is not None:
        row = rows[0]
        reason = (f"held-out loss stops improving at step {steps[row]}; {strength_reason(strengths, col)} "
                  "(no image-text model to compare strengths)")
        return Recommendation(row, col, steps[row], strengths[col], "convergence", reason)
    row = len(steps) - 1
    reason = f"no convergence or image-text scores: the last checkpoint; {strength_reason(strengths, col)}"
    return Recommendation(row, col, steps[row], strengths[col], "default", reason)


def eligible_columns(strengths: Sequence[float]) -> list[int]:
    """Strengths above 0; without any, the negative ones; without those, every column (all 0)."""
    return ([c for c, s in enumerate(strengths) if s > 0] or [c for c, s in enumerate(strengths) if s != 0]
            or list(range(len(strengths))))


def strength_reason(strengths: Sequence[float], col: int) -> str:
    """Why the strength of column `col`, in words that hold for any strengths a grid was asked for."""
    picked = strengths[col]
    if picked == 1.0:
        return "strength 1.0, the weight the LoRA was trained at"
    asked = ", ".join(f"{s:g}" for s in strengths)
    if picked > 0:
        return (f"strength {picked:g}, the nearest to 1.0 (the weight the LoRA was trained at) of those asked "
                f"({asked}): 1.0 is not in the grid")
    if picked < 0:
        return (f"strength {picked:g}, the nearest to 1.0 of those asked ({asked}), but no strength above 0 was "
                "asked: a negative strength applies the LoRA inverted (away from its subject); add strengths "
                "above 0, e.g. --strengths 0,0.5,1, for a strength to use")
    return "strength 0 is the base model alone: add strengths above 0, e.g. --strengths 0,0.5,1, for a strength to use"


def strip_trigger(prompt: str, trigger_word: str) -> str:
    """The prompt without its trigger word, tidied: "ohwx, a bottle on a beach" -> "a bottle on a beach"."""
    if not trigger_word.strip():
        return prompt.strip()
    text = re.sub(rf"(?<!\w){re.escape(trigger_word.strip())}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])\s*(?=[,;:.]|$)", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.lstrip(",;: ").strip()


def probe_subset(stems: Sequence[str], limit: int) -> list[str]:
    """At most `limit` stems, evenly spread over the sorted list: the same images every time."""
    ordered = sorted(stems)
    if len(ordered) <= limit:
        return ordered
    return [ordered[(i * len(ordered)) // limit] for i in range(limit)]
