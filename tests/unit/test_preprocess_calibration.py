"""The gate's calibrated defaults on real photographs (a subset of bench/gate.py's corpus): each
check separates its classes above a stated floor, and the cases from issue 17 come out right."""

from __future__ import annotations

import pytest

pytest.importorskip("skimage", reason="the real photos ship in scikit-image (a dev dependency)")

from real_photos import build_corpus, gate_scores, run_gate  # noqa: E402

PHOTOS = ("astronaut", "camera", "grace_hopper", "motorcycle_left")
VARIANTS = ("original", "artefacts", "burst", "crop90", "corner", "grey", "sepia", "screenshot", "defocus", "motion")
# Floors for the subset; the whole corpus's figures are in bench/gate.py's output.
FLOORS = {"near_duplicate": (0.98, 0.95), "blurry": (0.95, 0.95), "monochrome": (0.95, 0.95)}


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    cases = build_corpus(root / "corpus", PHOTOS, VARIANTS)
    return cases, run_gate(root / "corpus", cases, root / "out")


@pytest.mark.parametrize("check", sorted(FLOORS))
def test_calibrated_defaults_separate_the_classes(gate, check):
    cases, manifest = gate
    scores = gate_scores(cases, manifest)[check]
    precision, recall = FLOORS[check]
    assert scores.tp > 0
    assert scores.precision >= precision, scores.false
    assert scores.recall >= recall, scores.missed


def test_the_old_drawn_shape_calibration_missed_what_users_upload(gate):
    cases, manifest = gate
    old = gate_scores(cases, manifest, near_duplicate_distance=5)["near_duplicate"]
    assert old.recall < 0.8
    assert "motorcycle_left__original.png~motorcycle_left__stereo_right.png" in old.missed


def test_a_stereo_pair_groups_and_motion_blur_and_toned_photos_are_flagged(gate):
    _, manifest = gate
    entries = {entry.source_key: entry for entry in manifest.images}
    left, right = entries["motorcycle_left__original.png"], entries["motorcycle_left__stereo_right.png"]
    assert left.near_duplicate_group is not None and left.near_duplicate_group == right.near_duplicate_group
    assert "blurry" in entries["astronaut__motion.jpg"].flags
    assert "blurry" in entries["clock__real_motion.png"].flags
    sepia = entries["grace_hopper__sepia.jpg"]
    assert "monochrome" in sepia.flags
    assert any("learns monochrome" in warning for warning in sepia.warnings)
    assert "monochrome" not in entries["grace_hopper__original.png"].flags
    assert any("greyscale" in warning for warning in entries["camera__original.png"].warnings)
    # A grey copy is still the same photo: the colour comparison is skipped for it.
    grey = entries["astronaut__grey.jpg"]
    assert grey.near_duplicate_group == entries["astronaut__original.png"].near_duplicate_group is not None
    assert any("images are greyscale or toned monochrome" in warning for warning in manifest.warnings)
