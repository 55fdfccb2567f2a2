"""FLUX.1 Kontext through gRPC: an upload of before/after pairs (`<name>_control.png` beside
`<name>.png`, or `control/<name>.png`) is preprocessed into an editing dataset; a pair with a
missing half, halves of different aspect ratios or a control equal to its target gets a reason per
file and the rest is kept, the control halves cropped exactly as their targets; the dataset then
trains on the tiny Kontext model (its family detected from the model) and its checkpoints render."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw
from training_support import render_two_strength_grid, train_to_two_checkpoints

from fluxlora.common import keys
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client.errors import FluxloraClientError

# One store is enough here: the pairing changes the files, not the storage.
pytestmark = pytest.mark.parametrize("store", ["local"], indirect=True)

INSTRUCTION = "make the square a circle"


def photo(size: tuple[int, int], seed: int, shape: str) -> Image.Image:
    """Textured enough to pass the blur check, different for every seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.line((x, y, x + rng.randrange(-20, 20), y + rng.randrange(-20, 20)),
                  fill=tuple(rng.randrange(256) for _ in range(3)), width=2)
    w, h = size
    getattr(draw, shape)((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def write_pairs(folder):
    (folder / "control").mkdir(parents=True)
    photo((64, 64), 1, "ellipse").save(folder / "cat.png")  # suffix naming
    photo((64, 64), 1, "rectangle").save(folder / "cat_control.png")
    photo((96, 64), 2, "ellipse").save(folder / "dog.png")  # second-folder naming, wider than square
    photo((96, 64), 2, "rectangle").save(folder / "control" / "dog.png")
    photo((64, 64), 3, "ellipse").save(folder / "lonely.png")  # no control
    photo((64, 64), 4, "ellipse").save(folder / "tall.png")
    photo((64, 96), 4, "rectangle").save(folder / "tall_control.png")  # another aspect
    photo((64, 64), 5, "ellipse").save(folder / "same.png")
    photo((64, 64), 5, "ellipse").save(folder / "same_control.png")  # no edit
    photo((64, 64), 6, "rectangle").save(folder / "orphan_control.png")  # no target


def test_pairs_are_checked_per_file_and_the_rest_trains_and_renders(running, tiny_family, tiny_models, tmp_path):
    client, kontext = running, tiny_family("flux1-kontext")
    write_pairs(tmp_path / "upload")
    job = client.wait(client.preprocess(client.upload_photos(tmp_path / "upload"), base_size=64, crop_mode="square"))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    result = client.result(job)
    reasons = {r.source_key: r.reason for r in result.report.rejected}
    assert ("missing its control image: add lonely_control.<ext> beside it or control/lonely.<ext>"
            in reasons["lonely.png"])
    assert "control image without its target" in reasons["orphan_control.png"]
    for key in ("tall.png", "tall_control.png"):
        assert "tall_control.png is 64x96 and its target tall.png is 64x64" in reasons[key]
    for key in ("same.png", "same_control.png"):
        assert "equals its target" in reasons[key]
    assert result.image_count == 2 and result.report.file_count == 10

    dataset = result.dataset_id
    manifest = client.store.get_json(keys.dataset_manifest(dataset))
    assert manifest["paired"] is True
    pairs = {e["stem"]: (e["control_source_key"], e["control_file_name"]) for e in manifest["images"]}
    assert pairs == {"cat": ("cat_control.png", "control/cat.png"), "dog": ("control/dog.png", "control/dog.png")}
    # Both halves cropped by the same box to the same size (dog: the square centre of 96x64).
    for stem in pairs:
        target = client.store.get_file(keys.dataset_images(dataset) + f"{stem}.png", tmp_path / "t" / f"{stem}.png")
        control = client.store.get_file(keys.dataset_controls(dataset) + f"{stem}.png", tmp_path / "c" / f"{stem}.png")
        with Image.open(target) as t, Image.open(control) as c:
            assert t.size == c.size == (64, 64) and t.tobytes() != c.tobytes()
    with Image.open(tmp_path / "c" / "dog.png") as c:
        expected = photo((96, 64), 2, "rectangle").resize((64, 64), Image.Resampling.LANCZOS, box=(16, 0, 80, 64))
        assert c.convert("RGB").tobytes() == expected.tobytes()
    # The control images are no training images: captioning and review never list them.
    assert sorted(o.key.rsplit("/", 1)[1] for o in client.store.list(keys.dataset_images(dataset))) == [
        "cat.png", "dog.png"]

    # Auto-captions describe the after images: the job says to rewrite them as instructions; the
    # control images get none.
    captioned = client.wait(client.caption(dataset, "ohwx", model=str(tiny_models["florence2"]), max_new_tokens=8))
    assert captioned.state == jobs_pb2.JOB_STATE_SUCCEEDED, captioned.error
    assert any("editing (before/after pair) dataset" in w for w in captioned.warnings)
    assert client.result(captioned).caption_count == 2

    captions = {"cat": INSTRUCTION, "dog": INSTRUCTION}  # as the user rewrote them
    for stem, text in captions.items():
        client.store.put_bytes(keys.dataset_images(dataset) + f"{stem}.txt", text.encode())
    client.store.put_json(keys.dataset_captions(dataset), {"trigger_word": "", "captions": captions})
    run, trained = train_to_two_checkpoints(client, dataset, kontext)  # its family detected from the model
    assert trained.loss_csv_key == f"runs/{trained.run_id}/loss.csv" and client.store.exists(trained.loss_csv_key)

    # The grid's cells all edit the dataset's first control image (its default), shown in the header.
    rendered = render_two_strength_grid(client, run)
    report = client.store.get_json(rendered.report_key)
    assert report["spec"]["controlImage"] == keys.dataset_controls(dataset) + "cat.png"
    page = report["panels"][0]["pages"][0]["layout"]
    with Image.open(client.store.get_file(rendered.grid_key, tmp_path / "grid.png")) as sheet:
        assert page["title_height"] > 64 and sheet.height > 2 * 64 + page["title_height"]

    edited = client.wait(client.generate([INSTRUCTION], [{"run_id": trained.run_id}], width=64, height=64, steps=2,
                                         control_image=keys.dataset_controls(dataset) + "dog.png"))
    assert edited.state == jobs_pb2.JOB_STATE_SUCCEEDED, edited.error
    with pytest.raises(FluxloraClientError) as refused:
        client.generate([INSTRUCTION], base_model=str(kontext), width=64, height=64,
                        control_image="datasets/none/control/x.png")
    assert refused.value.code == "NOT_FOUND" and "spec.control_image" in refused.value.message
