"""Blur and near-duplicate checks: scores in the manifest, flags and warnings a person can act on."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.pipeline import preprocess_files
from fluxlora.preprocessing.quality import (
    blur_score,
    colour_signature,
    hash_distance,
    near_duplicate_clusters,
    perceptual_hashes,
)
from photo_corpus import scene

OPTIONS = PreprocessOptions(base_size=256)


def write(tmp_path, name, image, **save):
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    image.save(path, **save)
    return name, path


def test_blur_score_separates_sharp_from_defocused():
    sharp = scene((512, 384), 1)
    softer = sharp.filter(ImageFilter.GaussianBlur(1.5))
    blurred = sharp.filter(ImageFilter.GaussianBlur(4))
    scores = [blur_score(image) for image in (sharp, softer, blurred)]
    assert scores[0] > scores[1] > scores[2]
    assert scores[0] > 20 > scores[2]
    assert blur_score(Image.new("RGB", (300, 200), "grey")) == 0.0
    assert blur_score(Image.new("L", (2, 2))) == 0.0


def test_a_detailed_subject_on_a_plain_backdrop_scores_as_if_it_filled_the_frame():
    rng = np.random.default_rng(0)
    texture = Image.fromarray(np.clip(rng.normal(128, 30, (256, 256)), 0, 255).astype(np.uint8))
    framed = Image.new("L", (512, 512), 128)
    framed.paste(texture, (128, 128))  # a quarter of the frame; the rest is plain wall
    assert blur_score(framed) == pytest.approx(blur_score(texture), rel=0.1)
    # The whole-image variance of the Laplacian, the usual measure, would drop to about a quarter.
    assert whole_image_laplacian_variance(framed) < 0.35 * whole_image_laplacian_variance(texture)


def whole_image_laplacian_variance(image):
    g = np.asarray(image, dtype=np.float32)
    return float((g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]).var())


def test_blurry_images_are_flagged_with_their_score(tmp_path):
    files = [
        write(tmp_path, "sharp.png", scene((400, 300), 1)),
        write(tmp_path, "soft.png", scene((400, 300), 2).filter(ImageFilter.GaussianBlur(5))),
    ]
    manifest = preprocess_files(files, tmp_path / "out", OPTIONS)
    by_stem = {entry.stem: entry for entry in manifest.images}
    assert by_stem["sharp"].flags == [] and by_stem["sharp"].blur_score > OPTIONS.blur_threshold
    soft = by_stem["soft"]
    assert soft.flags == ["blurry"] and soft.blur_score < OPTIONS.blur_threshold
    assert any(f"blur score {soft.blur_score:.1f} is under 18" in w for w in soft.warnings)
    assert any("blurry" in w and "soft.png" in w for w in manifest.warnings)
    assert manifest.flagged_count == 1

    off = preprocess_files(files, tmp_path / "off", OPTIONS.model_copy(update={"blur_threshold": 0}))
    assert all("blurry" not in entry.flags for entry in off.images)


def signature(image):
    return (*perceptual_hashes(image.convert("L")), colour_signature(image))


def test_reencoded_and_resized_copies_are_near_duplicates_and_other_shots_are_not():
    original = scene((640, 480), 7)
    buffer = io.BytesIO()
    original.save(buffer, "JPEG", quality=35)
    variants = [
        original,
        Image.open(buffer).convert("RGB"),
        original.resize((320, 240), Image.Resampling.LANCZOS),
        original.filter(ImageFilter.GaussianBlur(1)),
    ]
    hashes = [signature(image) for image in variants]
    for phash, dhash, _ in hashes[1:]:
        assert hash_distance(phash, hashes[0][0]) <= 5 and hash_distance(dhash, hashes[0][1]) <= 5
    others = [signature(scene((640, 480), seed)) for seed in range(20, 30)]
    assert near_duplicate_clusters(others, 5) == []
    [cluster] = near_duplicate_clusters(others[:3] + hashes + others[3:], 5)
    assert cluster.members == [3, 4, 5, 6]


def test_the_same_framing_on_another_backdrop_colour_is_not_a_near_duplicate():
    # Grey hashes cannot tell a pink wall from a grey one; for a LoRA that is wanted variety.
    subject = scene((200, 300), 3)
    shots = []
    for wall in ((230, 190, 200), (150, 150, 150)):
        shot = Image.new("RGB", (600, 450), wall)
        shot.paste(subject, (200, 75))
        shots.append(signature(shot))
    assert hash_distance(shots[0][0], shots[1][0]) <= 5 and hash_distance(shots[0][1], shots[1][1]) <= 5
    assert near_duplicate_clusters(shots, 5) == []
    assert len(near_duplicate_clusters(shots, 5, colour_tolerance=255)) == 1


def test_clusters_link_transitively_and_report_their_widest_link():
    a = "0000000000000000"
    b = "000000000000000f"  # 4 bits from a
    c = "00000000000000ff"  # 4 bits from b, 8 from a
    far = "ffffffffffffffff"
    clusters = near_duplicate_clusters([(a, a, ""), (far, far, ""), (b, b, ""), (c, c, "")], 4)
    assert [(c.members, c.max_distance) for c in clusters] == [([0, 2, 3], 4)]
    assert near_duplicate_clusters([(a, a, ""), (b, b, "")], -1) == []
    assert near_duplicate_clusters([(a, a, "")], 5) == []


def near_duplicate_set(tmp_path, distinct, copies):
    """`distinct` different scenes, plus `copies` re-encodes of scene 0."""
    files = [write(tmp_path, f"shot_{i:02d}.png", scene((320, 240), 40 + i)) for i in range(distinct)]
    for i in range(copies):
        files.append(write(tmp_path, f"shot_00_copy{i}.jpg", scene((320, 240), 40), quality=60 + 10 * i))
    return files


def test_near_duplicates_are_grouped_flagged_and_all_kept(tmp_path):
    manifest = preprocess_files(near_duplicate_set(tmp_path, 4, 2), tmp_path / "out", OPTIONS)
    assert manifest.image_count == 6 and manifest.duplicate_count == 0
    [group] = manifest.near_duplicate_groups
    assert group.stems == ["shot_00", "shot_00_copy0", "shot_00_copy1"]
    assert group.source_keys == ["shot_00.png", "shot_00_copy0.jpg", "shot_00_copy1.jpg"]
    for entry in manifest.images:
        grouped = entry.stem in group.stems
        assert ("near_duplicate" in entry.flags) == grouped
        assert (entry.near_duplicate_group == 0) == grouped
    first = next(e for e in manifest.images if e.stem == "shot_00")
    assert any("near duplicate of shot_00_copy0.jpg, shot_00_copy1.jpg" in w for w in first.warnings)
    assert any("1 group(s) of near duplicates (3 images)" in w for w in manifest.warnings)
    assert not any(w.startswith("Too uniform") for w in manifest.warnings)

    off = preprocess_files(near_duplicate_set(tmp_path, 4, 2), tmp_path / "off",
                           OPTIONS.model_copy(update={"near_duplicate_distance": -1}))
    assert off.near_duplicate_groups == []


def test_a_set_made_mostly_of_one_shot_is_too_uniform(tmp_path):
    manifest = preprocess_files(near_duplicate_set(tmp_path, 2, 3), tmp_path / "out", OPTIONS)
    assert any(w.startswith("Too uniform: 5 images but only 2 distinct shots") for w in manifest.warnings)


@pytest.mark.parametrize(("lora_type", "warned"), [("style", True), ("concrete", False)])
def test_style_sets_warn_when_one_cluster_takes_too_large_a_share(tmp_path, lora_type, warned):
    options = OPTIONS.model_copy(update={"lora_type": lora_type})
    manifest = preprocess_files(near_duplicate_set(tmp_path, 8, 2), tmp_path / "out", options)
    share = [w for w in manifest.warnings if w.startswith("One cluster of near-identical images holds 3 of 10 (30%)")]
    assert bool(share) == warned
    if warned:
        assert "shot_00.png, shot_00_copy0.jpg, shot_00_copy1.jpg" in share[0]
