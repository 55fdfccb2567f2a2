"""Edit instructions from before/after descriptions (captioning/instructions.py): what differs
between the two, as a short imperative, lower case; the trigger placed and the remove phrases taken
out as in any caption; and both halves of a pair described in the same batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fluxlora.captioning.dataset import generate_pair_captions
from fluxlora.captioning.instructions import (
    ADD,
    CHANGE,
    DESCRIBE,
    REMOVE,
    RESTYLE,
    SAME,
    instruction_captions,
    write_instruction,
)

# before description, after description -> instruction, kind
SPEC = [
    # what was added, without the words that tie it in ("with", "wearing", ...)
    ("A dog sitting on a bench.", "A dog with a red hat sitting on a bench.", "add a red hat", ADD),
    ("A man in a suit", "A man in a suit wearing a hat", "add a hat", ADD),
    ("A car parked on a street.", "A red car parked on a street.", "make the car red", ADD),
    ("A dog.", "A dog on a beach.", "put it on a beach", ADD),
    ("A room with a sofa and a lamp.", "A room with a sofa, a lamp and a plant.", "add a plant", ADD),  # lists
    # what was taken away
    ("A man with glasses standing in a field.", "A man standing in a field.", "remove glasses", REMOVE),
    # what was replaced
    ("A red car parked on a street.", "A blue car parked on a street.", "change red to blue", CHANGE),
    ("A woman in a red dress.", "A woman in a blue dress, smiling.", "change red to blue and add smiling", CHANGE),
    ("A woman smiling.", "A woman frowning.", "change smiling to frowning", CHANGE),
    # a new medium in front: a style edit
    ("A man standing in a field.", "A cartoon of a man standing in a field.", "turn it into a cartoon", RESTYLE),
    ("A photo of a city street.", "An oil painting of a city street.", "turn it into an oil painting", RESTYLE),
    ("A photo of a man.", "A black and white photo of a man.", "turn it into a black and white photo", RESTYLE),
    # little in common: the after image, described
    ("A cat sitting on a sofa.", "A bowl of fruit on a table.", "make it a bowl of fruit on a table", DESCRIBE),
    ("a cat", "a dog", "make it a dog", DESCRIBE),
    ("", "A dog on a beach.", "make it a dog on a beach", DESCRIBE),
    # the captioner saw no difference: flagged for a hand-written instruction
    ("A cat sitting on a sofa.", "a cat sitting on a sofa", "make it a cat sitting on a sofa", SAME),
    ("A dog.", "", "", SAME),
]


@pytest.mark.parametrize(("before", "after", "instruction", "kind"), SPEC, ids=[row[2] or "empty" for row in SPEC])
def test_the_instruction_names_only_what_differs(before, after, instruction, kind):
    written = write_instruction(before, after)
    assert (written.text, written.kind) == (instruction, kind)


def test_more_differences_than_an_edit_describe_the_after_image():
    before = "A small red car on a wet street beside a tall tree at night."
    after = "A big blue car on a dry street beside a short tree at noon."
    written = write_instruction(before, after)
    assert (written.text, written.kind) == (f"make it {after[0].lower()}{after[1:-1]}", DESCRIBE)


def test_it_is_deterministic_and_keeps_the_captioners_words():
    first = write_instruction("A dog on a bench.", "A dog with a Stetson on a bench.")
    assert first == write_instruction("A dog on a bench.", "A dog with a Stetson on a bench.")
    assert first.text == "add a Stetson"


@pytest.mark.parametrize(("position", "expected"), [
    ("start", "ohwx, add a red hat"),
    ("end", "add a red hat, ohwx"),
    ("keep", "ohwx, add a red hat"),
])
def test_the_trigger_goes_where_the_trigger_rules_put_it(position, expected):
    written = instruction_captions({"a": "A dog on a bench."}, {"a": "A dog with a red hat on a bench."}, "ohwx",
                                   position=position)
    assert written.captions == {"a": expected} and written.kinds == {"a": ADD}


def test_remove_phrases_leave_both_descriptions_before_the_diff():
    before = {"a": "A woman on a bench.", "b": "A woman on a bench.", "c": "A dog."}
    after = {"a": "A woman with a red hat on a bench.", "b": "A woman on a bench in a park.", "c": "A dog asleep."}
    written = instruction_captions(before, after, "ohwx", ["woman", "zebra"])
    assert written.captions == {"a": "ohwx, add a red hat", "b": "ohwx, put it in a park", "c": "ohwx, add asleep"}
    assert written.phrase_counts == {"woman": 2, "zebra": 0}
    assert all("woman" not in caption for caption in written.captions.values())


class Named:
    """Describes an image by the name drawn into its file: its pixel value, recorded per batch."""

    name = "named"

    def __init__(self):
        self.batches: list[list[str]] = []

    def caption(self, images):
        words = [f"image {image.getpixel((0, 0))[0]}" for image in images]
        self.batches.append(words)
        return words


def _pairs(tmp_path: Path, count: int) -> list[tuple[Path, Path]]:
    pairs = []
    for i in range(count):
        for half, value in (("control", 2 * i), ("images", 2 * i + 1)):
            (tmp_path / half).mkdir(exist_ok=True)
            Image.new("RGB", (4, 4), (value, 0, 0)).save(tmp_path / half / f"p{i}.png")
        pairs.append((tmp_path / "control" / f"p{i}.png", tmp_path / "images" / f"p{i}.png"))
    return pairs


def test_both_halves_of_a_pair_are_described_in_the_same_batch(tmp_path):
    captioner = Named()
    progress = []
    before, after = generate_pair_captions(_pairs(tmp_path, 3), captioner, batch_size=5,
                                           progress=lambda done, total: progress.append((done, total)))
    assert captioner.batches == [["image 0", "image 1", "image 2", "image 3"], ["image 4", "image 5"]]
    assert before == {"p0": "image 0", "p1": "image 2", "p2": "image 4"}
    assert after == {"p0": "image 1", "p1": "image 3", "p2": "image 5"}
    assert progress == [(0, 6), (4, 6), (6, 6)]


def test_a_stop_keeps_only_the_pairs_described_whole(tmp_path):
    checks = iter([False, True])
    before, after = generate_pair_captions(_pairs(tmp_path, 3), Named(), batch_size=1,
                                           should_stop=lambda: next(checks))
    assert before == {} and after == {}  # one image of the first pair was described, not both
