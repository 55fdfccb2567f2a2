"""The preprocessing service as the dataset gate, through the SDK over gRPC: every file of a messy
upload gets its stated outcome, the rest of the dataset is processed, and nothing uploaded is lost."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from PIL import Image

from fluxlora.common.storage import LocalStore
from fluxlora_client import FluxloraClientError, JobFailed
from photo_corpus import BAD_INPUTS, jpeg_bytes, scene, write_bad_inputs, zip_bomb
from support import services_and_client


@pytest.fixture
def local(tmp_path):
    """The servers and a client on a local-directory store (the S3 backend runs in `running`)."""
    with services_and_client(LocalStore(tmp_path / "store"), tmp_path) as client:
        yield client


def snapshot(store, prefix):
    return {o.key: store.get_bytes(o.key) for o in store.list(prefix)}


def test_every_bad_input_gets_its_stated_outcome_and_nothing_uploaded_is_lost(running, tmp_path):
    client = running
    source = client.upload_photos(write_bad_inputs(tmp_path / "upload"))
    uploaded = snapshot(client.store, source)

    result = client.result(client.wait(client.preprocess(source, base_size=128)))
    manifest = json.loads(client.store.get_bytes(result.manifest_key))
    kept = {image["source_key"]: image for image in manifest["images"]}
    rejected = {entry["source_key"]: entry["reason"] for entry in manifest["rejected"]}
    duplicates = {entry["source_key"]: entry["duplicate_of"] for entry in manifest["duplicates"]}
    near = {key: group["source_keys"] for group in manifest["near_duplicate_groups"] for key in group["source_keys"]}

    for name, (outcome, phrase) in BAD_INPUTS.items():
        if outcome == "kept":
            assert name in kept, (name, rejected.get(name))
            assert phrase in " ".join(kept[name]["warnings"]), (name, kept[name]["warnings"])
        elif outcome == "near":
            assert name in kept and near[name] == sorted([name, phrase])
        elif outcome == "rejected":
            assert phrase in rejected[name], (name, rejected.get(name))
        else:
            assert duplicates[name] == phrase
    # every file is accounted for exactly once; refused zips count as one file
    accounted = [*kept, *rejected, *duplicates]
    assert sorted(accounted) == sorted(BAD_INPUTS) and manifest["file_count"] == len(BAD_INPUTS)

    # the odd-but-usable ones came out as plain RGB images of the right size
    assert kept["cmyk.jpg"]["source_mode"] == "CMYK"
    assert kept["deep16.png"]["source_mode"].startswith("I")
    assert kept["rotated.jpg"]["original_size"] == [240, 320]  # stored 320x240, EXIF says turn it
    for image in kept.values():
        stored = client.store.get_bytes(f"datasets/{result.dataset_id}/images/{image['file_name']}")
        with Image.open(io.BytesIO(stored)) as out:
            assert out.mode == "RGB" and list(out.size) == image["size"]
            assert "exif" not in out.info and "icc_profile" not in out.info
        assert image["blur_score"] > 0 and len(image["phash"]) == 16

    # nothing uploaded is lost: the upload is untouched and every object is kept byte for byte
    assert snapshot(client.store, source) == uploaded
    raw = snapshot(client.store, f"datasets/{result.dataset_id}/raw/")
    assert raw == {f"datasets/{result.dataset_id}/raw/{key[len(source):]}": data for key, data in uploaded.items()}

    # the report in the gRPC result says the same, with every rejected file and its reason
    report = result.report
    assert (report.file_count, report.image_count, report.rejected_count, report.duplicate_count) == (
        len(BAD_INPUTS), len(kept), len(rejected), len(duplicates)
    )
    assert {r.source_key: r.reason for r in report.rejected} == rejected
    assert [list(g.duplicate_source_keys) for g in report.duplicate_groups] == [["good_1_copy.jpg"]]
    assert [list(g.source_keys) for g in report.near_duplicate_groups] == [["good_2.jpg", "good_2_reencoded.jpg"]]
    assert dict(report.buckets) == manifest["buckets"] and list(report.warnings) == manifest["warnings"]
    assert json.loads(client.store.get_bytes(result.report_key))["rejected_count"] == len(rejected)
    with Image.open(io.BytesIO(client.store.get_bytes(result.contact_sheet_key))) as sheet:
        assert sheet.format == "PNG" and sheet.width >= 600


def test_a_zip_is_uploaded_by_the_sdk_and_unpacked_by_the_service(local, tmp_path):
    archive = tmp_path / "holiday.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for i in range(3):
            zipped.writestr(f"day {i}/IMG_{i}.jpg", jpeg_bytes(scene((320, 240), 60 + i)))
        zipped.writestr("__MACOSX/day 0/._IMG_0.jpg", b"\0\5\26\7")
    source = local.upload_photos(archive)
    assert [o.key for o in local.store.list(source)] == [source + "holiday.zip"]

    result = local.result(local.wait(local.preprocess(source, base_size=128)))
    manifest = json.loads(local.store.get_bytes(result.manifest_key))
    assert [i["source_key"] for i in manifest["images"]] == [f"holiday.zip/day {i}/IMG_{i}.jpg" for i in range(3)]
    assert [i["stem"] for i in manifest["images"]] == ["IMG_0", "IMG_1", "IMG_2"]
    assert [r["source_key"] for r in manifest["rejected"]] == ["holiday.zip/__MACOSX/day 0/._IMG_0.jpg"]
    # the zip itself is the original kept under raw/
    assert local.store.get_bytes(f"datasets/{result.dataset_id}/raw/holiday.zip") == archive.read_bytes()


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        ("slip", "unsafe path '../../../home/user/.bashrc.jpg'"),
        ("bomb", "zip bomb"),
    ],
)
def test_an_upload_that_is_only_an_unsafe_zip_fails_with_the_reason(local, tmp_path, make, phrase):
    archive = tmp_path / f"{make}.zip"
    if make == "slip":
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("ok.jpg", jpeg_bytes(scene((320, 240), 1)))
            zipped.writestr("../../../home/user/.bashrc.jpg", b"echo owned")
    else:
        zip_bomb(archive, inflated_bytes=32 * 1024**2)
    source = local.upload_photos(archive)
    before = snapshot(local.store, "")
    with pytest.raises(JobFailed) as failed:
        local.wait(local.preprocess(source, base_size=128))
    assert failed.value.code == "FAILED_PRECONDITION"
    assert f"{make}.zip: archive refused" in failed.value.message and phrase in failed.value.message
    assert "Traceback" not in failed.value.message
    after = snapshot(local.store, "")
    assert {k: v for k, v in after.items() if not k.startswith("jobs/")} == {
        k: v for k, v in before.items() if not k.startswith("jobs/")
    }


def test_crop_modes_and_options_reach_the_pipeline(local, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    scene((600, 300), 5).save(folder / "wide.png")
    cutout = scene((300, 300), 6).convert("RGBA")
    cutout.putpixel((0, 0), (0, 0, 0, 0))
    cutout.save(folder / "cutout.png")
    source = local.upload_photos(folder)

    for mode in ("subject", "pad"):
        result = local.result(local.wait(local.preprocess(source, base_size=128, crop_mode=mode,
                                                          background="#102030", blur_threshold=0,
                                                          near_duplicate_distance=-1, monochrome_threshold=0)))
        assert result.report.crop_mode == mode and dict(result.report.buckets) == {"128x128": 2}
        manifest = json.loads(local.store.get_bytes(result.manifest_key))
        assert manifest["options"]["background"] == [16, 32, 48] and manifest["options"]["blur_threshold"] == 0
        assert manifest["options"]["near_duplicate_distance"] == -1 and manifest["options"]["monochrome_threshold"] == 0
        wide = next(i for i in manifest["images"] if i["stem"] == "wide")
        assert (wide["pad_box"] is not None) == (mode == "pad")
    spec = local.spec(local.list_jobs("preprocessing")[0])
    assert spec.crop_mode == 4 and spec.background == "#102030"


def test_the_same_upload_and_options_give_the_same_dataset_id_and_bytes(local, tmp_path):
    source = local.upload_photos(write_bad_inputs(tmp_path / "upload"))
    first = local.result(local.wait(local.preprocess(source, base_size=128)))
    images = snapshot(local.store, f"datasets/{first.dataset_id}/images/")
    again = local.result(local.wait(local.preprocess(source, base_size=128)))
    assert again.dataset_id == first.dataset_id
    assert snapshot(local.store, f"datasets/{first.dataset_id}/images/") == images
    other = local.result(local.wait(local.preprocess(source, base_size=128, crop_mode="pad")))
    assert other.dataset_id != first.dataset_id


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"background": "white"}, "spec.background 'white' is not a colour"),
        ({"blur_threshold": -1.0}, "spec.blur_threshold is -1.0, outside the allowed range [0, 100000]"),
        ({"near_duplicate_distance": 40}, "spec.near_duplicate_distance is 40, outside the allowed range [-1, 32]"),
        ({"monochrome_threshold": -2.0}, "spec.monochrome_threshold is -2.0, outside the allowed range [0, 255]"),
        ({"min_side": -5}, "spec.min_side is -5, outside the allowed range"),
        ({"base_size": 1000}, "base_size must be a positive multiple of 64"),
    ],
)
def test_bad_options_are_invalid_argument_at_submit(local, photos, options, phrase):
    source = local.upload_photos(photos)
    with pytest.raises(FluxloraClientError) as err:
        local.preprocess(source, **options)
    assert err.value.code == "INVALID_ARGUMENT" and phrase in err.value.message
    assert local.list_jobs("preprocessing") == []
