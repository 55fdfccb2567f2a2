"""The contact sheet a preprocessing job stores for an upload of before/after pairs is the pair sheet
(a tile per pair, control | target), drawn after the pairing decided which pairs are kept."""

from __future__ import annotations

import pytest
from PIL import Image

from fluxlora.common.storage import LocalStore
from fluxlora.preprocessing import contact_sheet as sheet_module
from fluxlora.preprocessing.pair_sheet import PAIR_WIDTH
from fluxlora_api.v1 import jobs_pb2
from photo_corpus import scene


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def test_a_pair_upload_stores_the_pair_sheet(running, tmp_path):
    client = running
    upload = tmp_path / "upload"
    upload.mkdir()
    scene((128, 128), 1).save(upload / "cat.png")
    scene((128, 128), 101).save(upload / "cat_control.png")
    scene((128, 128), 4).save(upload / "tall.png")
    scene((128, 192), 104).save(upload / "tall_control.png")  # refused: another aspect
    job = client.wait(client.preprocess(client.upload_photos(upload), base_size=128, crop_mode="square"))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    result = client.result(job)
    with Image.open(client.store.get_file(result.contact_sheet_key, tmp_path / "sheet.png")) as opened:
        sheet = opened.convert("RGB")
    pad, thumb = sheet_module.PAD, sheet_module.THUMB
    assert sheet.width % (PAIR_WIDTH + 2 * pad) == 0  # pair tiles, not one per file
    top = sheet_module.HEADER + pad
    # cat.png's tile: the control's thumbnail on the left, the target's on the right.
    assert sheet.getpixel((pad + thumb // 2, top + thumb // 2)) != sheet_module.BACKGROUND
    assert sheet.getpixel((pad + PAIR_WIDTH - thumb // 2, top + thumb // 2)) != sheet_module.BACKGROUND
    # tall.png's tile (the second): the refused pair, dark, though its target passed every image check.
    second = PAIR_WIDTH + 3 * pad
    assert sheet.getpixel((second + PAIR_WIDTH - 10, top + thumb - 10)) == sheet_module.REJECT
