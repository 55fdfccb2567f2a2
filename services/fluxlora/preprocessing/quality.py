"""Per-image quality measures (blur, perceptual hashes) and near-duplicate grouping.

All of them run on the training image, i.e. on what the trainer will see: a slightly soft 24 MP
photo is sharp at 1024 px, and an upscaled small one is blurry there whatever it looked like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

BLUR_GRID = 8
BLUR_TOP_FRACTION = 0.25
# Largest difference (of 255) in any channel of any quarter's mean colour between near duplicates:
# a re-encode moves it by 1-3, a backdrop of another colour by 40+.
COLOUR_TOLERANCE = 24


def blur_score(grey: Image.Image) -> float:
    """Variance of the Laplacian where the image has detail; low means blurry or featureless.

    The whole-image variance of the Laplacian (the usual focus measure) punishes what LoRA
    photos often are: a sharp subject on a plain backdrop. So the 3x3 Laplacian is split into a
    BLUR_GRID x BLUR_GRID grid of tiles and the score is the mean variance of the most detailed
    quarter of them: a sharp subject filling a quarter of the frame scores as sharp.
    """
    pixels = np.asarray(grey.convert("L"), dtype=np.float32)
    if min(pixels.shape) < 3:
        return 0.0
    laplacian = (
        pixels[:-2, 1:-1] + pixels[2:, 1:-1] + pixels[1:-1, :-2] + pixels[1:-1, 2:] - 4.0 * pixels[1:-1, 1:-1]
    )
    height, width = laplacian.shape
    rows = np.linspace(0, height, min(BLUR_GRID, height) + 1).astype(int)
    cols = np.linspace(0, width, min(BLUR_GRID, width) + 1).astype(int)
    # Per-tile variance as E[x^2] - E[x]^2 from tile sums: one pass, no Python loop over tiles.
    values = laplacian.astype(np.float64)
    sums = np.add.reduceat(np.add.reduceat(values, rows[:-1], axis=0), cols[:-1], axis=1)
    squares = np.add.reduceat(np.add.reduceat(values * values, rows[:-1], axis=0), cols[:-1], axis=1)
    counts = np.outer(np.diff(rows), np.diff(cols))
    variances = np.sort((squares / counts - (sums / counts) ** 2).ravel())[::-1]
    top = max(1, int(len(variances) * BLUR_TOP_FRACTION))
    # Rounded so manifests do not differ in the last float digit between CPUs.
    return round(float(np.mean(variances[:top])), 2)


def perceptual_hashes(grey: Image.Image) -> tuple[str, str]:
    """(phash, dhash) as 16 hex digits each: 64-bit DCT and gradient hashes (imagehash)."""
    # imagehash Lanczos-resizes to 32x32 (phash) and 9x8 (dhash); a box reduction to a short
    # side of 64+ first gives the same bits at a fortieth of the cost (4 ms -> 0.1 ms at 512 px).
    factor = max(1, min(grey.size) // 64)
    small = grey.reduce(factor) if factor > 1 else grey
    return str(imagehash.phash(small)), str(imagehash.dhash(small))


def colour_signature(image: Image.Image) -> str:
    """Mean RGB of each quarter of the image, 12 bytes as hex: what the grey hashes cannot see."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((2, 2), Image.Resampling.BOX).tobytes().hex()


def hash_distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


@dataclass(frozen=True)
class Cluster:
    members: list[int]
    """Indices into the hashes given, ascending."""
    max_distance: int
    """Largest distance on a link that joined the cluster (the larger of the two hashes)."""


def near_duplicate_clusters(
    hashes: Sequence[tuple[str, str, str]], max_distance: int, colour_tolerance: int = COLOUR_TOLERANCE
) -> list[Cluster]:
    """Groups of 2+ images linked by pairs that look alike (single linkage): (phash, dhash,
    colour signature) triples within `max_distance` bits on both hashes and `colour_tolerance`
    on every channel of every quarter's mean colour (an empty signature skips that check).

    Each grey hash alone confuses different shots of one product on one backdrop (the DCT hash
    sees the same layout, the gradient hash the same edges), and both miss a change of backdrop
    colour, which for a LoRA is exactly the variety wanted; re-encodes, resizes and light edits
    of one shot agree on all three. Pairs are compared with numpy one row at a time: 10,000
    images take about a second.
    """
    count = len(hashes)
    if count < 2 or max_distance < 0:
        return []
    bits = np.array([[int(p, 16), int(d, 16)] for p, d, _ in hashes], dtype=np.uint64)
    with_colour = all(len(c) == 24 for _, _, c in hashes)
    colours = np.array([list(bytes.fromhex(c)) for _, _, c in hashes], dtype=np.int16) if with_colour else None
    parent = list(range(count))
    link = [0] * count

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(count - 1):
        rest = bits[i + 1 :]
        distances = np.maximum(np.bitwise_count(rest[:, 0] ^ bits[i, 0]), np.bitwise_count(rest[:, 1] ^ bits[i, 1]))
        alike = distances <= max_distance
        if colours is not None:
            alike &= np.abs(colours[i + 1 :] - colours[i]).max(axis=1) <= colour_tolerance
        for offset in np.flatnonzero(alike):
            j = i + 1 + int(offset)
            a, b = root(i), root(j)
            low, high = min(a, b), max(a, b)
            parent[high] = low
            link[low] = max(link[low], link[high], int(distances[offset]))
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(root(i), []).append(i)
    return [Cluster(members, link[r]) for r, members in sorted(groups.items()) if len(members) > 1]
