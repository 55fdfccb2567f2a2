"""Real photographs that ship inside installed packages, and the hard cases the dataset gate must
get right, derived from them deterministically: bench/gate.py measures every check on the whole
set, tests/unit/test_preprocess_calibration.py on a small subset.

Sources (all bundled in the wheels, nothing is fetched; dev dependency scikit-image, BSD-3;
matplotlib is a runtime dependency already):
  scikit-image skimage/data/ (per-image notices from skimage.data's docstrings)
    astronaut.png          NASA, public domain
    chelsea.png            CC0, Stefan van der Walt
    coffee.png             CC0, Rachel Michetti
    rocket.jpg             SpaceX, public domain
    hubble_deep_field.jpg  NASA, public domain
    retina.jpg             CC0 (Wikimedia Commons)
    ihc.png                immunohistochemistry, no known copyright restrictions
    camera.png             CC0, Lav Varshney (stored greyscale)
    coins.png              Brooklyn Museum, no known copyright restrictions (stored greyscale)
    text.png               public domain (stored greyscale)
    brick.png, grass.png, gravel.png   CC0 textures (stored greyscale)
    clock_motion.png       public domain, Stefan van der Walt: a photo taken while moving the
                           camera (real motion blur, stored greyscale)
    motorcycle_left.png, motorcycle_right.png   Middlebury 2014 stereo benchmark (Nesic,
                           Westling, Wang, Kitajima, Krathwohl, Scharstein), free for research
                           with citation: a real stereo pair
    lfw_subset.npy         100 face crops (25x25 grey) from Labeled Faces in the Wild (news photos
                           collected from the web; no licence stated, research use): bench/gate.py
                           only, as look-alike negatives (centred faces, different shots)
  matplotlib mpl-data/sample_data/
    grace_hopper.jpg       US Navy portrait, public domain

Every photo is first brought to a long side of 512 px (the bench trains at base size 512), so
derived blur and shifts mean the same at training size for all of them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

LONG_SIDE = 512

COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "ihc", "grace_hopper",
          "motorcycle_left")
GREY = ("camera", "coins", "text", "brick", "grass", "gravel")
_FILES = {
    "rocket": "rocket.jpg", "hubble_deep_field": "hubble_deep_field.jpg", "retina": "retina.jpg",
    "grace_hopper": "grace_hopper.jpg",
}

NEAR = "near"
FAR = "far"


@dataclass(frozen=True)
class Case:
    name: str
    """File name in the corpus folder: <photo>__<variant>.<ext>."""
    family: str
    """The photo it derives from; the stereo pair's right frame belongs to motorcycle_left."""
    variant: str
    duplicate: str | None
    """NEAR: the same shot (should be grouped with the family); FAR: another framing (should not)."""
    blurry: bool | None
    monochrome: bool | None


def source_photo(name: str) -> Image.Image:
    if name == "grace_hopper":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    else:
        import skimage

        path = Path(skimage.__file__).parent / "data" / _FILES.get(name, f"{name}.png")
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    scale = LONG_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    return image


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as reopened:
        return reopened.convert("RGB")


def _crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = image.size
    return image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))


def _burst(image: Image.Image, seed: int) -> Image.Image:
    """The next frame of a burst: the camera moved ~3%, the exposure ~5%, fresh sensor noise."""
    rng = np.random.default_rng(seed)
    shifted = _crop(image, 0.03, 0.015, 1.0, 1.0).resize(image.size, Image.Resampling.LANCZOS)
    pixels = np.asarray(shifted, dtype=np.float32) * 1.05 + rng.normal(0, 3, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _sepia(image: Image.Image) -> Image.Image:
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None]
    tone = np.array([1.07, 0.94, 0.74], dtype=np.float32)
    return Image.fromarray(np.clip(grey * tone, 0, 255).astype(np.uint8))


def _cyanotype(image: Image.Image) -> Image.Image:
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255
    dark, light = np.array([20, 40, 90], np.float32), np.array([225, 235, 250], np.float32)
    return Image.fromarray((dark + (light - dark) * grey).astype(np.uint8))


def _faded(image: Image.Image) -> Image.Image:
    return ImageEnhance.Color(image).enhance(0.08)


def _overexposed(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) * 1.7 + 30
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _caption(image: Image.Image) -> Image.Image:
    """A photo with text over it: a meme caption or a watermark."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, image.height // 14))
    draw.text((image.width // 20, image.height * 4 // 5), "SUMMER 2024 @fluxlora", fill=(255, 255, 255), font=font,
              stroke_width=2, stroke_fill=(0, 0, 0))
    return out


def _screenshot(image: Image.Image) -> Image.Image:
    """The photo inside an app screenshot: title bar, text lines, a flat background."""
    w, h = image.size
    shot = Image.new("RGB", (w, h), (250, 250, 252))
    draw = ImageDraw.Draw(shot)
    draw.rectangle((0, 0, w, h // 10), fill=(40, 90, 200))
    font = ImageFont.load_default(size=max(10, h // 24))
    draw.text((10, h // 40), "Photos - Album", fill=(255, 255, 255), font=font)
    inset = image.resize((w * 3 // 5, h * 3 // 5), Image.Resampling.LANCZOS)
    shot.paste(inset, (w // 5, h // 7))
    for i in range(3):
        draw.text((w // 5, h * 4 // 5 + i * (h // 22)), f"Shared with {i + 2} people - tap to open", fill=(60, 60, 60),
                  font=font)
    return shot


def _motion(image: Image.Image, length: int) -> Image.Image:
    """The camera moved `length` px horizontally during the exposure (a box kernel along x)."""
    pixels = np.asarray(image, dtype=np.float32)
    padded = np.pad(pixels, ((0, 0), (length // 2, length - 1 - length // 2), (0, 0)), mode="edge")
    blurred = sum(padded[:, i:i + pixels.shape[1]] for i in range(length)) / length
    return Image.fromarray(np.clip(blurred, 0, 255).astype(np.uint8))


# variant -> (make, duplicate, blurry, monochrome override or None, file extension)
VARIANTS = {
    "original": (lambda im, s: im, None, False, None, "png"),
    "reencoded": (lambda im, s: _jpeg(im, 92), NEAR, False, None, "jpg"),
    "artefacts": (lambda im, s: _jpeg(im, 12), NEAR, False, None, "jpg"),
    "resized": (lambda im, s: im.resize((im.width * 3 // 5, im.height * 3 // 5), Image.Resampling.BILINEAR), NEAR,
                None, None, "png"),
    "burst": (lambda im, s: _burst(im, s), NEAR, False, None, "jpg"),
    "crop90": (lambda im, s: _crop(im, 0.05, 0.05, 0.95, 0.95), NEAR, False, None, "jpg"),
    "corner": (lambda im, s: _crop(im, 0.0, 0.0, 0.6, 0.6), FAR, None, None, "png"),
    "grey": (lambda im, s: _jpeg(im.convert("L").convert("RGB"), 90), NEAR, False, True, "jpg"),
    "sepia": (lambda im, s: _jpeg(_sepia(im), 90), NEAR, False, True, "jpg"),
    "cyanotype": (lambda im, s: _cyanotype(im), NEAR, False, True, "png"),
    "faded": (lambda im, s: _jpeg(_faded(im), 90), NEAR, False, True, "jpg"),
    "overexposed": (lambda im, s: _overexposed(im), NEAR, None, None, "jpg"),
    "caption": (lambda im, s: _caption(im), NEAR, False, None, "png"),
    "screenshot": (lambda im, s: _screenshot(im), FAR, False, None, "png"),
    "defocus": (lambda im, s: im.filter(ImageFilter.GaussianBlur(2.5)), NEAR, True, None, "jpg"),
    "motion": (lambda im, s: _motion(im, 13), NEAR, True, None, "jpg"),
    "soft": (lambda im, s: im.filter(ImageFilter.GaussianBlur(1.0)), NEAR, None, None, "jpg"),
    # A small copy (a chat-app thumbnail, a face cut from a group shot): upscaled 2.5x at training.
    "thumbnail": (lambda im, s: im.resize((im.width * 2 // 5, im.height * 2 // 5), Image.Resampling.LANCZOS), NEAR,
                  None, None, "jpg"),
}
QUICK_PHOTOS = ("astronaut", "coffee", "camera", "grace_hopper")
QUICK_VARIANTS = ("original", "artefacts", "burst", "crop90", "corner", "grey", "sepia", "defocus", "motion")


def build_corpus(folder: Path, photos=COLOUR + GREY, variants=tuple(VARIANTS), *, stereo: bool = True,
                 real_blur: bool = True) -> list[Case]:
    """Write every (photo, variant) into `folder` and return the labelled cases."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for seed, photo in enumerate(photos):
        image = source_photo(photo)
        grey_source = photo in GREY
        for variant in variants:
            make, duplicate, blurry, monochrome, ext = VARIANTS[variant]
            if grey_source and variant in {"grey", "faded"}:
                continue  # the same as the original
            name = f"{photo}__{variant}.{ext}"
            made = make(image, seed)
            if grey_source and variant in {"original", "reencoded", "artefacts"}:
                made = made.convert("L")  # stored as greyscale files, as they ship
            made.save(folder / name, quality=95) if ext == "jpg" else made.save(folder / name)
            if variant == "screenshot":
                monochrome = False if not grey_source else None  # a grey photo in a blue-titled app: either
            cases.append(Case(name, photo, variant, duplicate, blurry,
                              monochrome if monochrome is not None or variant == "screenshot" else grey_source))
    if stereo and "motorcycle_left" in photos:
        source_photo_right = _right_frame()
        source_photo_right.save(folder / "motorcycle_left__stereo_right.png")
        cases.append(Case("motorcycle_left__stereo_right.png", "motorcycle_left", "stereo_right", NEAR, False, False))
    if real_blur:
        clock = _skimage_photo("clock_motion.png")
        clock.save(folder / "clock__real_motion.png")
        cases.append(Case("clock__real_motion.png", "clock", "real_motion", None, True, True))
    return cases


def _skimage_photo(file: str) -> Image.Image:
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / file) as opened:
        opened.load()
        return opened.copy()


def _right_frame() -> Image.Image:
    image = _skimage_photo("motorcycle_right.png").convert("RGB")
    scale = LONG_SIDE / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


def pair_labels(cases: list[Case]) -> dict[tuple[str, str], bool]:
    """Labelled pairs for the near-duplicate check: True for two NEAR members (or the original) of
    one family, False for two different photos or a FAR framing against its family."""
    labels: dict[tuple[str, str], bool] = {}
    for i, a in enumerate(cases):
        for b in cases[i + 1:]:
            key = (a.name, b.name)
            if a.family != b.family:
                labels[key] = False
                continue
            kinds = {_kind(a), _kind(b)}
            if FAR in kinds:
                labels[key] = False
            elif None not in kinds:
                labels[key] = True
    return labels


def _kind(case: Case) -> str | None:
    return "original" if case.variant == "original" else case.duplicate


@dataclass
class Scores:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    missed: list[str] = field(default_factory=list)
    false: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    def add(self, predicted: bool, actual: bool, name: str) -> None:
        if predicted and actual:
            self.tp += 1
        elif predicted:
            self.fp += 1
            self.false.append(name)
        elif actual:
            self.fn += 1
            self.missed.append(name)


def run_gate(folder: Path, cases: list[Case], out: Path, *, workers: int = 1, base_size: int = 512):
    """The real pipeline on the corpus; returns the manifest."""
    from fluxlora.preprocessing.manifest import PreprocessOptions
    from fluxlora.preprocessing.pipeline import preprocess_files

    files = [(case.name, folder / case.name) for case in cases]
    return preprocess_files(files, out, PreprocessOptions(base_size=base_size), workers=workers)


def gate_scores(cases: list[Case], manifest, **thresholds) -> dict[str, Scores]:
    """Precision/recall of each check on the manifest's recorded scores, with `thresholds`
    (PreprocessOptions fields) in place of the manifest's options."""
    from fluxlora.preprocessing.pipeline import near_duplicate_groups

    options = manifest.options.model_copy(update=thresholds)
    entries = {entry.source_key: entry for entry in manifest.images}
    scores = {"near_duplicate": Scores(), "blurry": Scores(), "monochrome": Scores(), "upscaled": Scores()}
    for case in cases:
        entry = entries.get(case.name)
        if entry is None:
            continue
        if case.blurry is not None:
            scores["blurry"].add(entry.blur_score < options.blur_threshold, case.blurry, case.name)
        full_size = case.variant == "original" and max(entry.original_size) >= options.base_size
        if full_size or case.variant in {"thumbnail", "resized"}:
            scores["upscaled"].add("upscaled" in entry.flags, not full_size, case.name)
        if case.monochrome is not None:
            scores["monochrome"].add(entry.colour_spread < options.monochrome_threshold, case.monochrome, case.name)
    images = list(entries.values())
    group_of: dict[str, int] = {}
    for number, cluster in enumerate(near_duplicate_groups(images, options)):
        for index in cluster.members:
            group_of[images[index].source_key] = number
    for (a, b), same in pair_labels([case for case in cases if case.name in entries]).items():
        grouped = a in group_of and group_of.get(a) == group_of.get(b)
        scores["near_duplicate"].add(grouped, same, f"{a}~{b}")
    return scores


def face_hashes(size: int = 256) -> list[tuple[str, str, str]]:
    """(phash, dhash, "") of the 100 LFW face crops, enlarged to `size`: centred faces of
    different shots, the layout every face LoRA dataset has."""
    import skimage

    from fluxlora.preprocessing.quality import perceptual_hashes

    faces = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")[:100]
    hashes = []
    for face in faces:
        image = Image.fromarray((face * 255).astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
        hashes.append((*perceptual_hashes(image), ""))
    return hashes
