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
# Largest difference (of 255) in either chroma channel (R-G, (R+G)/2-B) of any quarter's mean
# colour between near duplicates: a re-encode moves it by 1-3, an exposure change by up to ~20, a
# backdrop of another colour by 40+.
COLOUR_TOLERANCE = 24


def blur_score(grey: Image.Image) -> float:
    """Detail in the image's least sharp direction, where it has detail; low means blurry or featureless.

    The second difference of the pixels is taken along four directions (across, down and both
    diagonals); for each, the image is split into a BLUR_GRID x BLUR_GRID grid of tiles and the
    mean variance of the most detailed quarter of them is kept, and the score is the smallest of
    the four. A defocused photo loses detail in every direction; a photo taken while the camera
    moved loses it along the movement only, which the usual whole-image variance of the
    Laplacian hardly notices (real and simulated motion blur still scored 20 to 500 on it, like
    sharp photos). The top quarter of tiles keeps a sharp subject on a plain backdrop sharp.
    """
    pixels = np.asarray(grey.convert("L"), dtype=np.float32)
    if min(pixels.shape) < 3:
        return 0.0
    centre = 2.0 * pixels[1:-1, 1:-1]
    directions = (
        pixels[1:-1, :-2] + pixels[1:-1, 2:] - centre,
        pixels[:-2, 1:-1] + pixels[2:, 1:-1] - centre,
        (pixels[:-2, :-2] + pixels[2:, 2:] - centre) / 2,  # a diagonal step is sqrt(2) long
        (pixels[:-2, 2:] + pixels[2:, :-2] - centre) / 2,
    )
    # Rounded so manifests do not differ in the last float digit between CPUs.
    return round(min(_top_tile_variance(values) for values in directions), 2)


def _top_tile_variance(values: np.ndarray) -> float:
    """Mean variance of the BLUR_TOP_FRACTION most detailed tiles of a BLUR_GRID x BLUR_GRID grid
    (the last few rows and columns that do not fill a whole tile are left out)."""
    height, width = values.shape
    grid_rows, grid_cols = min(BLUR_GRID, height), min(BLUR_GRID, width)
    tile_h, tile_w = height // grid_rows, width // grid_cols
    tiles = values[: tile_h * grid_rows, : tile_w * grid_cols].astype(np.float64)
    tiles = tiles.reshape(grid_rows, tile_h, grid_cols, tile_w)
    # Per-tile variance as E[x^2] - E[x]^2 from tile sums: two passes, no Python loop over tiles.
    count = tile_h * tile_w
    means = tiles.sum(axis=(1, 3)) / count
    variances = np.sort((np.einsum("ijkl,ijkl->ik", tiles, tiles) / count - means**2).ravel())[::-1]
    top = max(1, int(len(variances) * BLUR_TOP_FRACTION))
    return float(np.mean(variances[:top]))


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


def colour_spread(image: Image.Image) -> float:
    """How far the image's colours stray from one tint: 0 for grey, a few for toned monochrome
    (sepia, cyanotype, a nearly desaturated photo), 10 to 150 for colour photos.

    Each pixel's chroma (R-G, (R+G)/2-B) is split along the image's mean tint and across it; the
    score is the 99th percentile of the part across, so a sepia print (all chroma along one tint,
    stronger in the highlights) scores like a grey one, while a colour photo with a few strong
    colours in 1% of it does not. Measured on a 128 px copy: 1 ms.
    """
    small = image if image.mode == "RGB" else image.convert("RGB")
    factor = max(1, max(small.size) // 128)
    if factor > 1:
        small = small.reduce(factor)
    pixels = np.asarray(small, dtype=np.float32).reshape(-1, 3)
    red, green, blue = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    chroma = np.stack([red - green, (red + green) / 2 - blue], axis=1)
    mean = chroma.mean(axis=0)
    norm = float(np.hypot(*mean))
    if norm > 1e-3:
        across = np.abs(chroma[:, 0] * mean[1] - chroma[:, 1] * mean[0]) / norm
    else:
        across = np.hypot(chroma[:, 0], chroma[:, 1])
    return round(float(np.percentile(across, 99)), 2)


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
    on both chroma channels of every quarter's mean colour (an empty signature on either side,
    e.g. a monochrome image, skips that check: a grey copy of a photo is still that photo).

    On real photos (bench/gate.py) different photos are 18+ bits apart on the DCT hash, while
    burst frames, a stereo pair, overexposed or captioned copies land at 2-13. The grey hashes
    miss a change of backdrop colour, which for a LoRA is exactly the variety wanted, hence the
    chroma check. Pairs are compared with numpy one row at a time: 10,000 images take about a
    second.
    """
    count = len(hashes)
    if count < 2 or max_distance < 0:
        return []
    bits = np.array([[int(p, 16), int(d, 16)] for p, d, _ in hashes], dtype=np.uint64)
    has_colour = np.array([len(c) == 24 for _, _, c in hashes])
    colours = _quarter_chroma([c if len(c) == 24 else "00" * 12 for _, _, c in hashes])
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
        if has_colour[i]:
            close = np.abs(colours[i + 1 :] - colours[i]).max(axis=1) <= colour_tolerance
            alike &= close | ~has_colour[i + 1 :]
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


def _quarter_chroma(signatures: Sequence[str]) -> np.ndarray:
    """(n, 8): each quarter's (R-G, (R+G)/2-B) from colour signatures, for comparing colour without
    brightness (an over- or underexposed frame of a burst keeps its chroma, roughly)."""
    if not signatures:
        return np.zeros((0, 8))
    rgb = np.array([list(bytes.fromhex(c)) for c in signatures], dtype=np.float64).reshape(-1, 4, 3)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.concatenate([red - green, (red + green) / 2 - blue], axis=1)
