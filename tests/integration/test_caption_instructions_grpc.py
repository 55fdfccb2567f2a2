"""Captioning an editing dataset through gRPC: each before/after pair is described half by half in
the same batch and its caption is the edit between the two descriptions ("ohwx, add a red hat"),
by default; the descriptions stay with the caption version for review; a pair described alike is
named for a hand-written instruction; and "instruction" is refused where it cannot apply."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw

from fluxlora.captioning.captioners import base as captioners
from fluxlora.common import keys
from fluxlora.common.storage import LocalStore
from fluxlora.domain.caption_versions import version_key
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClientError
from support import services_and_client

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)
# What the test captioner says of a picture whose middle has this colour.
SAYS = {RED: "A dog with a red hat sitting on a bench.", BLUE: "A dog sitting on a bench.",
        GREEN: "A dog sitting on a bench."}


class ColourCaptioner:
    """Describes an image by the colour of its middle, and records what each batch held."""

    name = "colours"
    batches: list[list[str]] = []

    def __init__(self, *args, **kwargs):
        pass

    def caption(self, images):
        said = [SAYS[min(SAYS, key=lambda c: _distance(c, image.getpixel((32, 32))))] for image in images]
        ColourCaptioner.batches.append(said)
        return said


def _distance(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=False))


def photo(seed: int, middle: tuple[int, int, int]) -> Image.Image:
    """64 px, textured enough for the blur check, a square of `middle` in the centre."""
    rng = random.Random(seed)
    image = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.randrange(64), rng.randrange(64)
        draw.line((x, y, x + rng.randrange(-20, 20), y + rng.randrange(-20, 20)),
                  fill=tuple(rng.randrange(256) for _ in range(3)), width=2)
    draw.rectangle((16, 16, 48, 48), fill=middle)
    return image


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setitem(captioners._registered, "colours", ColourCaptioner)
    monkeypatch.setattr(ColourCaptioner, "batches", [])
    with services_and_client(LocalStore(tmp_path / "store"), tmp_path) as client:
        yield client


def preprocess(client, folder) -> str:
    job = client.wait(client.preprocess(client.upload_photos(folder), base_size=64, crop_mode="square"))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    return client.result(job).dataset_id


def test_a_pair_dataset_is_captioned_with_edit_instructions(client, tmp_path):
    upload = tmp_path / "pairs"
    upload.mkdir()
    photo(1, RED).save(upload / "hat.png")
    photo(1, BLUE).save(upload / "hat_control.png")
    photo(2, GREEN).save(upload / "plain.png")  # the captioner sees no difference in this pair
    photo(3, GREEN).save(upload / "plain_control.png")
    dataset = preprocess(client, upload)
    model = str(tmp_path)  # the test captioner loads nothing

    job = client.wait(client.caption(dataset, "ohwx", captioner="colours", model=model, batch_size=3,
                                     remove_phrases=["bench"]))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    result = client.result(job)
    captions = client.captions.list(dataset)
    assert {e.stem: e.caption for e in captions.entries} == {
        "hat": "ohwx, add a red hat", "plain": "ohwx, make it a dog sitting on"}
    assert dict(result.removed_phrase_counts) == {"bench": 2}
    # before and after side by side: a batch of 3 holds one pair
    assert ColourCaptioner.batches == [[SAYS[BLUE], SAYS[RED]], [SAYS[GREEN], SAYS[GREEN]]]
    assert any("captions are edit instructions written from a description of each before and after image" in w
               and "review them" in w for w in job.warnings)
    assert any("1 pair(s) got the same description before and after" in w and "plain" in w for w in job.warnings)
    assert not any("describe the after images only" in w for w in job.warnings)

    version = client.store.get_json(version_key(dataset, result.version))
    assert version["source"]["style"] == "instruction" and "edit instructions" in version["comment"]
    assert version["source"]["descriptions"] == {
        "hat": {"before": SAYS[BLUE], "after": SAYS[RED]}, "plain": {"before": SAYS[GREEN], "after": SAYS[GREEN]}}
    # training reads the sidecars: the instructions, nothing for the control images
    assert client.store.get_bytes(keys.dataset_images(dataset) + "hat.txt").decode() == "ohwx, add a red hat\n"
    assert not [o.key for o in client.store.list(keys.dataset_controls(dataset)) if o.key.endswith(".txt")]

    # The review page shows both descriptions under each instruction, after edits too.
    client.captions.edit(dataset, {"hat": "ohwx, put a red hat on the dog"})
    page = client.captions.write_review_page(dataset, tmp_path / "review.html", image_size=32).read_text()
    assert (f'put a red hat on the dog</textarea><p class="note">before: {SAYS[BLUE]}\nafter: {SAYS[RED]}</p>'
            in page)

    # Asked for, descriptions of the after images stay possible, with the old advice.
    job = client.wait(client.caption(dataset, "ohwx", captioner="colours", model=model, style="natural"))
    assert [e.caption for e in client.captions.list(dataset).entries] == [
        "ohwx, a dog with a red hat sitting on a bench.", "ohwx, a dog sitting on a bench."]
    assert any("describe the after images only" in w for w in job.warnings)

    with pytest.raises(FluxloraClientError) as refused:
        client.caption(dataset, "ohwx", captioner="import", style="instruction")
    assert refused.value.code == "INVALID_ARGUMENT" and "'import' captioner" in refused.value.message


def test_instructions_need_a_pair_dataset(client, tmp_path):
    upload = tmp_path / "photos"
    upload.mkdir()
    photo(4, RED).save(upload / "one.png")
    dataset = preprocess(client, upload)
    with pytest.raises(FluxloraClientError) as refused:
        client.caption(dataset, "ohwx", captioner="colours", model=str(tmp_path), style="instruction")
    assert refused.value.code == "INVALID_ARGUMENT"
    assert f"dataset {dataset!r} is not an editing dataset" in refused.value.message
    assert "use 'natural' or 'tags'" in refused.value.message and "_control" in refused.value.message
    # unset, an ordinary dataset keeps the ordinary default
    job = client.wait(client.caption(dataset, "ohwx", captioner="colours", model=str(tmp_path)))
    assert client.store.get_json(version_key(dataset, client.result(job).version))["source"]["style"] == "natural"
