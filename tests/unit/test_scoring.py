"""Picking the best checkpoint and strength from score tables (fluxlora.evaluation.scoring)."""

from __future__ import annotations

import re

import pytest

from fluxlora.evaluation.scoring import (
    convergence,
    normalise,
    probe_subset,
    recommend,
    strip_trigger,
)

STEPS = [750, 1500, 2250, 3000]
STRENGTHS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def table(f):
    return [[f(r, s) for s in STRENGTHS] for r in range(len(STEPS))]


# The user's guide case: the LoRA converges near 1500 steps and works best near strength 0.8.
# Fidelity grows with strength and training; flexibility falls with strength, and faster for the
# over-trained checkpoints, which start copying the training photos.
TRAINED = [0.5, 0.9, 0.95, 1.0]
OVERFIT = [0.04, 0.08, 0.15, 0.2]
FIDELITY = table(lambda r, s: 0.2 + 0.6 * s * TRAINED[r])
FLEXIBILITY = table(lambda r, s: 0.3 - OVERFIT[r] * s**4)
LOSSES = [0.80, 0.62, 0.61, 0.605]
BASE_LOSS = 1.0


# --- convergence ------------------------------------------------------------------------------

def test_convergence_is_the_first_checkpoint_near_the_best_later_loss():
    found = convergence(STEPS, LOSSES, BASE_LOSS)
    assert found.step == 1500
    assert found.improved and found.best_loss == 0.605 and found.reference_loss == 1.0


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ([0.9, 0.7, 0.5, 0.3], 3000),  # still falling steadily: only the last is converged
        ([0.50, 0.49, 0.49, 0.49], 750),  # converged before the first checkpoint
        ([0.8, 0.6, 0.7, 0.9], 1500),  # a later rise (over-fitting) does not delay convergence
        ([0.9, 0.70, 0.72, 0.69], 1500),  # noise smaller than the tolerance is ignored
        ([0.9, 0.7, 0.72, 0.6], 3000),  # a real late drop counts
    ],
)
def test_convergence_on_constructed_curves(losses, expected):
    assert convergence(STEPS, losses, base_loss=1.0).step == expected


def test_without_a_base_loss_the_first_checkpoint_is_the_reference():
    # improvement 0.8 -> 0.6 = 0.2; 0.61 is within 10% of it from the best later loss
    assert convergence(STEPS, [0.8, 0.61, 0.60, 0.60]).step == 1500


def test_a_run_that_never_beats_the_base_is_flagged():
    found = convergence(STEPS, [1.01, 1.02, 1.0, 1.03], base_loss=1.0)
    assert not found.improved and found.step == 750


def test_a_tighter_tolerance_waits_longer():
    losses = [0.8, 0.62, 0.61, 0.605]
    assert convergence(STEPS, losses, 1.0, tolerance=0.1).step == 1500
    assert convergence(STEPS, losses, 1.0, tolerance=0.02).step == 2250


@pytest.mark.parametrize(
    ("steps", "losses", "fragment"),
    [([750, 1500], [0.5], "one loss per checkpoint"), ([1500, 750], [0.5, 0.4], "ascend"),
     ([750, 1500], [0.5, float("nan")], "not finite at step(s) [1500]")],
)
def test_convergence_rejects_bad_curves(steps, losses, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        convergence(steps, losses)


# --- the recommendation -----------------------------------------------------------------------

def test_the_recommendation_picks_the_known_answer():
    converged = convergence(STEPS, LOSSES, BASE_LOSS).step
    found = recommend(STEPS, STRENGTHS, converged_step=converged, fidelity=FIDELITY, flexibility=FLEXIBILITY)
    assert (found.step, found.strength) == (1500, 0.8)
    assert (found.row, found.col) == (1, 4)
    assert found.basis == "convergence+image-text"
    assert "1500" in found.reason
    assert len(found.scores) == 4 and all(len(row) == 6 for row in found.scores)
    assert found.scores[1][4] == max(max(row[1:]) for row in found.scores[1:])


def test_checkpoints_before_convergence_are_not_candidates():
    # An under-trained checkpoint that scores best is still passed over.
    fidelity = [row[:] for row in FIDELITY]
    fidelity[0] = [1.0] * len(STRENGTHS)
    found = recommend(STEPS, STRENGTHS, converged_step=1500, fidelity=fidelity, flexibility=FLEXIBILITY)
    assert found.step >= 1500
    unconstrained = recommend(STEPS, STRENGTHS, fidelity=fidelity, flexibility=FLEXIBILITY)
    assert unconstrained.step == 750 and unconstrained.basis == "image-text"


def test_strength_zero_is_never_recommended():
    # The base model follows the prompt best; with all weight on flexibility it would win.
    found = recommend(STEPS, STRENGTHS, fidelity=FIDELITY, flexibility=FLEXIBILITY, flexibility_weight=1.0)
    assert found.strength > 0


def test_ties_go_to_the_earlier_checkpoint_then_the_lower_strength():
    flat = table(lambda r, s: 0.5 if s > 0 else 0.0)
    found = recommend(STEPS, STRENGTHS, fidelity=flat, flexibility=flat)
    assert (found.step, found.strength) == (750, 0.2)


def test_without_image_text_scores_the_converged_checkpoint_at_strength_one():
    found = recommend(STEPS, STRENGTHS, converged_step=1500)
    assert (found.step, found.strength, found.basis) == (1500, 1.0, "convergence")
    assert found.scores is None


def test_with_no_evidence_the_last_checkpoint_at_the_strength_nearest_one():
    found = recommend(STEPS, [0.0, 0.5, 0.9, 1.5], converged_step=None)
    assert (found.step, found.strength, found.basis) == (3000, 0.9, "default")


def test_a_grid_of_only_strength_zero_still_answers():
    assert recommend([100], [0.0]).strength == 0.0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"fidelity": FIDELITY}, "both"), ({"fidelity": FIDELITY[:2], "flexibility": FLEXIBILITY[:2]}, "4 rows x 6")],
)
def test_recommend_rejects_mismatched_tables(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        recommend(STEPS, STRENGTHS, **kwargs)


def test_normalise_maps_the_grid_onto_zero_to_one():
    assert normalise([[1.0, 3.0], [2.0, 5.0]]) == [[0.0, 0.5], [0.25, 1.0]]
    assert normalise([[0.7, 0.7]]) == [[0.0, 0.0]]


# --- helpers ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("ohwx, a bottle on a beach", "a bottle on a beach"),
        ("a photo of OHWX bottle", "a photo of bottle"),
        ("a photo of ohwxy bottle", "a photo of ohwxy bottle"),
        ("a bottle, ohwx, on a table", "a bottle, on a table"),
        ("a bottle on a table, ohwx", "a bottle on a table"),
        ("ohwx", ""),
    ],
)
def test_strip_trigger(prompt, expected):
    assert strip_trigger(prompt, "ohwx") == expected


def test_probe_subset_is_evenly_spread_and_stable():
    stems = [f"img{i:02d}" for i in range(10)]
    assert probe_subset(reversed(stems), 4) == ["img00", "img02", "img05", "img07"]
    assert probe_subset(stems[:3], 8) == stems[:3]


@pytest.mark.parametrize(("strengths", "picked", "words"), [
    ([0.0, 0.5, 1.0], 1.0, "strength 1.0, the weight the LoRA was trained at"),
    ([0.0, 0.4, 0.8], 0.8, "strength 0.8, the nearest to 1.0 (the weight the LoRA was trained at) of those asked "
                           "(0, 0.4, 0.8): 1.0 is not in the grid"),
    ([1.2, 1.5], 1.2, "1.0 is not in the grid"),
    ([-1.0], -1.0, "no strength above 0 was asked: a negative strength applies the LoRA inverted"),
    ([0.0, -1.0, -0.5], -0.5, "strength -0.5"),
    ([0.0], 0.0, "strength 0 is the base model alone: add strengths above 0"),
])
def test_the_reason_states_the_strength_rule_for_any_strengths_asked(strengths, picked, words):
    for converged in (None, 200):
        found = recommend([100, 200], strengths, converged_step=converged)
        assert found.strength == picked and words in found.reason, found.reason
        assert "nearest 1.0" not in found.reason or picked == 1.0


def test_image_text_picks_on_negative_strengths_say_what_they_mean():
    found = recommend([100], [0.0, -1.0], fidelity=[[0.2, 0.3]], flexibility=[[0.5, 0.1]])
    assert found.strength == -1.0 and "applies the LoRA inverted" in found.reason
