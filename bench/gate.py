"""Precision and recall of the dataset gate's checks on real photographs and their hard cases.

    .venv/bin/python bench/gate.py            # the whole corpus (about 250 images, ~30 s)
    .venv/bin/python bench/gate.py --quick    # the subset the unit test uses

The photos ship inside scikit-image and matplotlib (tests/real_photos.py lists them with their
licences); the hard cases (bursts, a real stereo pair, crops, re-encodes, heavy JPEG artefacts,
grey, sepia and cyanotype copies, overexposure, captions, screenshots, defocus and motion blur,
a real motion-blurred photo) are derived from them deterministically; 100 LFW face crops measure
how often centred faces of different shots are grouped. Every image goes through
the real pipeline (preprocess_files at base size 512) and each check is scored on what the
manifest records, for a sweep of thresholds around the default:

  near duplicates: pairs that end up in one group vs pairs labelled "the same shot" (a burst
    frame, the other stereo frame, a 90% crop, a re-encode, a grey copy...) or "not" (another
    photo, a 60% corner crop, the photo inside a screenshot);
  blurry: images flagged vs those labelled blurry (defocus, motion, the real motion blur);
  monochrome: images flagged vs those labelled grey or toned.

Cases a person could call either way (a 1 px defocus, a 0.6x downscale) carry no label.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from real_photos import (  # noqa: E402
    QUICK_PHOTOS,
    QUICK_VARIANTS,
    build_corpus,
    face_hashes,
    gate_scores,
    run_gate,
)

from fluxlora.preprocessing.manifest import (  # noqa: E402
    DEFAULT_BLUR_THRESHOLD,
    DEFAULT_MONOCHROME_THRESHOLD,
    DEFAULT_NEAR_DUPLICATE_DISTANCE,
)

SWEEPS = {
    "near_duplicate_distance": [5, 8, 10, 11, 12, 13, 14, 16],
    "blur_threshold": [5, 10, 14, 16, 18, 20, 24, 28, 40],
    "monochrome_threshold": [2, 4, 6, 8, 9, 10, 12, 14],
}
CHECK = {"near_duplicate_distance": "near_duplicate", "blur_threshold": "blurry", "monochrome_threshold": "monochrome"}
DEFAULTS = {
    "near_duplicate_distance": DEFAULT_NEAR_DUPLICATE_DISTANCE,
    "blur_threshold": DEFAULT_BLUR_THRESHOLD,
    "monochrome_threshold": DEFAULT_MONOCHROME_THRESHOLD,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the unit test's subset only")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corpus"
        if args.quick:
            cases = build_corpus(folder, QUICK_PHOTOS + ("motorcycle_left",), QUICK_VARIANTS)
        else:
            cases = build_corpus(folder)
        manifest = run_gate(folder, cases, Path(tmp) / "out", workers=args.workers)
    families = len({case.family for case in cases})
    print(f"{len(cases)} images from {families} real photos; {manifest.image_count} kept, "
          f"{manifest.rejected_count} rejected, {manifest.duplicate_count} exact duplicates\n")
    print(f"{'check':<16} {'threshold':>9} {'precision':>9} {'recall':>7} {'TP':>5} {'FP':>4} {'FN':>4}")
    for option, values in SWEEPS.items():
        for value in values:
            scores = gate_scores(cases, manifest, **{option: value})[CHECK[option]]
            mark = "  <- default" if value == DEFAULTS[option] else ""
            print(f"{CHECK[option]:<16} {value:>9g} {scores.precision:>9.3f} {scores.recall:>7.3f} "
                  f"{scores.tp:>5} {scores.fp:>4} {scores.fn:>4}{mark}")
        print()
    worst = gate_scores(cases, manifest)
    upscaled = worst["upscaled"]
    print(f"{'upscaled':<16} {'>1.05x':>9} {upscaled.precision:>9.3f} {upscaled.recall:>7.3f} "
          f"{upscaled.tp:>5} {upscaled.fp:>4} {upscaled.fn:>4}  (thumbnails and 0.6x copies vs originals)\n")
    if not args.quick:
        faces = face_hashes()
        pairs = len(faces) * (len(faces) - 1) // 2
        print(f"LFW faces ({len(faces)} centred faces, different shots: look-alike negatives), pairs grouped:")
        print("  " + ", ".join(f"{d}: {grouped_pairs(faces, d)}/{pairs}" for d in (5, 10, 13, 16)) + "\n")
    by_variant = near_duplicate_recall_by_variant(cases, manifest)
    print("near-duplicate recall at the default, pairs (original, variant):")
    print("  " + ", ".join(f"{variant} {found}/{total}" for variant, (found, total) in sorted(by_variant.items())))
    print()
    for check, scores in worst.items():
        for kind, names in (("missed", scores.missed), ("false", scores.false)):
            if names:
                print(f"{check} {kind} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")


def grouped_pairs(hashes, distance: int) -> int:
    from fluxlora.preprocessing.quality import near_duplicate_clusters

    return sum(len(c.members) * (len(c.members) - 1) // 2 for c in near_duplicate_clusters(hashes, distance))


def near_duplicate_recall_by_variant(cases, manifest) -> dict[str, tuple[int, int]]:
    from fluxlora.preprocessing.pipeline import near_duplicate_groups

    images = list(manifest.images)
    group = {}
    for number, cluster in enumerate(near_duplicate_groups(images, manifest.options)):
        for index in cluster.members:
            group[images[index].source_key] = number
    originals = {case.family: case.name for case in cases if case.variant == "original"}
    counts: dict[str, tuple[int, int]] = {}
    for case in cases:
        original = originals.get(case.family)
        if case.duplicate != "near" or original is None or case.name not in {e.source_key for e in images}:
            continue
        found, total = counts.get(case.variant, (0, 0))
        same = case.name in group and group.get(case.name) == group.get(original)
        counts[case.variant] = (found + same, total + 1)
    return counts


if __name__ == "__main__":
    main()
