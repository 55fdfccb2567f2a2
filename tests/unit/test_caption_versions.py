"""Caption versions and review operations on the store (both backends): every change is a new
immutable version, approval checks the trigger word and publishes what training reads."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from PIL import Image

from fluxlora.captioning import review
from fluxlora.captioning.cleaning import count_trigger
from fluxlora.domain.caption_versions import CaptionVersions, content_hash, version_key
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, NotFound

DATASET = "ds-0123456789ab"
STEMS = ["img-1", "img-2", "img-3"]


@pytest.fixture
def dataset(store):
    """A preprocessed dataset (manifest + three images) with a first, auto-made caption version."""
    for stem in STEMS:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (10 * len(stem), 0, 0)).save(buffer, "PNG")
        store.put_bytes(f"datasets/{DATASET}/images/{stem}.png", buffer.getvalue(), "image/png")
    store.put_json(f"datasets/{DATASET}/manifest.json", {"images": []})
    CaptionVersions(store, DATASET).append(
        parent=0, kind="auto", trigger_word="ohwx", author="cap-1",
        captions={"img-1": "ohwx, a bottle", "img-2": "ohwx, a plastic bottle", "img-3": "ohwx, a cup"},
    )
    return store


def captions(store, version: int = 0) -> dict[str, str]:
    return {e["stem"]: e["caption"] for e in review.list_captions(store, DATASET, version).entries}


def test_an_edit_is_a_new_version_and_the_old_one_stays(dataset) -> None:
    change = review.edit_captions(dataset, DATASET, {"img-1": "ohwx,  a green\nbottle"}, author="ana", comment="colour")
    assert change.created and change.changed_stems == ["img-1"]
    v2 = change.version
    assert (v2.version, v2.parent, v2.kind, v2.author, v2.comment) == (2, 1, "edit", "ana", "colour")
    assert v2.changed_stems == ["img-1"]
    # whitespace is tidied to one line, as kohya sidecars need
    assert captions(dataset)["img-1"] == "ohwx, a green bottle"
    assert captions(dataset, 1)["img-1"] == "ohwx, a bottle"
    assert [v.version for v in review.history(dataset, DATASET)[0]] == [1, 2]


def test_an_edit_that_changes_nothing_stores_nothing(dataset) -> None:
    change = review.edit_captions(dataset, DATASET, {"img-1": "ohwx, a bottle"})
    assert not change.created and change.version.version == 1
    assert CaptionVersions(dataset, DATASET).numbers() == [1]


def test_an_edit_warns_about_a_caption_without_the_trigger_once(dataset) -> None:
    change = review.edit_captions(dataset, DATASET, {"img-1": "a bottle", "img-2": "ohwx ohwx"})
    assert change.warnings == [
        "caption 'img-1' holds the trigger word 'ohwx' 0 times; approval needs exactly one",
        "caption 'img-2' holds the trigger word 'ohwx' 2 times; approval needs exactly one",
    ]


def test_captions_for_images_that_do_not_exist_are_not_found_naming_the_stems(dataset) -> None:
    with pytest.raises(NotFound, match="no image\\(s\\) img-9, nope"):
        review.edit_captions(dataset, DATASET, {"img-1": "ohwx", "nope": "x", "img-9": "y"})
    with pytest.raises(InvalidArgument, match="no captions to edit"):
        review.edit_captions(dataset, DATASET, {})


def test_an_edit_made_against_an_old_version_never_overwrites_a_newer_one(dataset) -> None:
    review.edit_captions(dataset, DATASET, {"img-1": "ohwx, first reviewer"})  # v2
    # a second reviewer, still looking at v1, edits img-1 too: refused, naming it
    with pytest.raises(FailedPrecondition, match="img-1 changed after version 1 \\(the latest is 2\\)"):
        review.edit_captions(dataset, DATASET, {"img-1": "ohwx, second reviewer"}, base_version=1)
    # ... but their edit of a caption nobody touched since goes in on top of v2
    change = review.edit_captions(dataset, DATASET, {"img-3": "ohwx, a mug"}, base_version=1)
    assert change.version.version == 3
    assert captions(dataset) == {"img-1": "ohwx, first reviewer", "img-2": "ohwx, a plastic bottle",
                                 "img-3": "ohwx, a mug"}


def test_find_replace_reports_the_changed_captions_and_stores_a_version(dataset) -> None:
    dry = review.replace_in_captions(dataset, DATASET, "bottle", "jar", dry_run=True)
    assert not dry.created and dry.changed_stems == ["img-1", "img-2"]
    assert CaptionVersions(dataset, DATASET).numbers() == [1]
    change = review.replace_in_captions(dataset, DATASET, "plastic", "", author="ana")
    assert change.created and change.changed_stems == ["img-2"]
    assert change.version.kind == "replace" and change.version.source["find"] == "plastic"
    assert captions(dataset)["img-2"] == "ohwx, a bottle"
    nothing = review.replace_in_captions(dataset, DATASET, "zebra", "horse")
    assert not nothing.created and nothing.changed_stems == [] and nothing.version.version == 2


def test_find_replace_bad_inputs(dataset) -> None:
    with pytest.raises(InvalidArgument, match="find is empty"):
        review.replace_in_captions(dataset, DATASET, " ", "x")
    with pytest.raises(InvalidArgument, match="not a valid regular expression"):
        review.replace_in_captions(dataset, DATASET, "(", "x", regex=True)
    with pytest.raises(NotFound, match="no caption\\(s\\) img-7"):
        review.replace_in_captions(dataset, DATASET, "a", "b", stems=["img-7"])
    review.edit_captions(dataset, DATASET, {"img-1": "ohwx, a jug"})
    with pytest.raises(FailedPrecondition, match="version 1 is no longer the latest"):
        review.replace_in_captions(dataset, DATASET, "cup", "mug", base_version=1)


def test_approval_publishes_the_sidecars_and_captions_json_training_reads(dataset) -> None:
    review.edit_captions(dataset, DATASET, {"img-3": "ohwx, a mug"})
    change = review.approve(dataset, DATASET, author="ana", comment="looks right")
    approved = change.version
    assert change.created and approved.approved and approved.kind == "approve"
    assert (approved.version, approved.parent, approved.changed_stems) == (3, 2, [])
    for stem, caption in approved.captions.items():
        assert dataset.get_bytes(f"datasets/{DATASET}/images/{stem}.txt").decode() == caption + "\n"
        assert count_trigger(caption, "ohwx") == 1
    published = dataset.get_json(f"datasets/{DATASET}/captions.json")
    assert published["trigger_word"] == "ohwx"
    assert published["captions"] == approved.captions
    assert published["approved_version"] == published["caption_version"] == 3
    assert published["sha256"] == approved.sha256 == content_hash("ohwx", approved.captions)
    # approving it again stores nothing new
    again = review.approve(dataset, DATASET)
    assert not again.created and again.version.version == 3
    listing = review.list_captions(dataset, DATASET)
    assert (listing.head_version, listing.approved_version) == (3, 3)


def test_an_older_version_can_be_approved_again(dataset) -> None:
    review.approve(dataset, DATASET)  # v2, approving v1
    review.edit_captions(dataset, DATASET, {"img-1": "ohwx, a vase"})  # v3
    review.approve(dataset, DATASET)  # v4
    change = review.approve(dataset, DATASET, version=1)  # back to v1's captions
    assert change.version.version == 5 and change.version.parent == 1
    assert dataset.get_json(f"datasets/{DATASET}/captions.json")["captions"]["img-1"] == "ohwx, a bottle"


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"img-1": "a bottle"}, "img-1 \\(0 times\\)"),
        ({"img-2": "ohwx and ohwx"}, "img-2 \\(2 times\\)"),
        ({"img-1": "OHWX with Ohwx", "img-3": "a cup"}, "img-1 \\(2 times\\), img-3 \\(0 times\\)"),
    ],
)
def test_approval_needs_the_trigger_exactly_once_in_every_caption(dataset, edits: dict, message: str) -> None:
    review.edit_captions(dataset, DATASET, edits)
    with pytest.raises(FailedPrecondition, match=f"exactly once; version 2 does not in: {message}"):
        review.approve(dataset, DATASET)
    assert not dataset.exists(f"datasets/{DATASET}/captions.json")
    # fix_triggers puts it in once, keeping an existing one where it is
    change = review.approve(dataset, DATASET, fix_triggers=True)
    assert change.changed_stems == sorted(edits)
    assert change.version.source == {"fixed_triggers": sorted(edits)}
    for caption in change.version.captions.values():
        assert count_trigger(caption, "ohwx") == 1


def test_approval_refuses_captions_and_images_that_do_not_pair_up(dataset) -> None:
    dataset.delete(f"datasets/{DATASET}/images/img-3.png")
    with pytest.raises(FailedPrecondition, match="captions for images that do not exist: img-3"):
        review.approve(dataset, DATASET)
    dataset.put_bytes(f"datasets/{DATASET}/images/img-4.png", dataset.get_bytes(f"datasets/{DATASET}/images/img-1.png"))
    with pytest.raises(FailedPrecondition, match="images without a caption: img-4"):
        review.approve(dataset, DATASET)


def test_a_damaged_version_is_reported_not_used(dataset) -> None:
    key = version_key(DATASET, 1)
    data = dataset.get_json(key)
    data["captions"]["img-1"] = "tampered"
    dataset.put_json(key, data)
    with pytest.raises(FailedPrecondition, match="does not match its sha256"):
        review.list_captions(dataset, DATASET)


def test_unknown_versions_and_datasets(dataset) -> None:
    with pytest.raises(NotFound, match="no caption version 7: it has versions 1 to 1"):
        review.list_captions(dataset, DATASET, version=7)
    with pytest.raises(NotFound, match="ds-missing"):
        review.list_captions(dataset, "ds-missing")
    dataset.put_json("datasets/ds-uncaptioned/manifest.json", {"images": []})
    with pytest.raises(FailedPrecondition, match="no captions yet: run caption first"):
        review.list_captions(dataset, "ds-uncaptioned")


def test_captions_from_before_versions_become_version_one(store) -> None:
    store.put_json("datasets/ds-old/manifest.json", {"images": []})
    store.put_json("datasets/ds-old/captions.json", {"trigger_word": "ohwx", "captions": {"a": "ohwx, a dog"}})
    listing = review.list_captions(store, "ds-old")
    assert (listing.version.version, listing.version.kind) == (1, "legacy")
    assert listing.entries[0]["caption"] == "ohwx, a dog" and listing.entries[0]["image_key"] == ""


def test_list_gives_image_keys_urls_and_trigger_counts(dataset) -> None:
    entries = review.list_captions(dataset, DATASET, include_urls=True).entries
    assert [e["stem"] for e in entries] == STEMS
    assert entries[0]["image_key"] == f"datasets/{DATASET}/images/img-1.png"
    assert entries[0]["image_url"].startswith(("file://", "http://"))
    assert all(e["trigger_count"] == 1 for e in entries)


def test_export_is_a_kohya_zip_of_the_approved_version(dataset) -> None:
    with pytest.raises(FailedPrecondition, match="no approved captions"):
        review.export_zip(dataset, DATASET)
    review.approve(dataset, DATASET)
    version, info = review.export_zip(dataset, DATASET)
    assert version.version == 2 and info.key == f"datasets/{DATASET}/exports/captions-v0002.zip" and info.sha256
    with zipfile.ZipFile(io.BytesIO(dataset.get_bytes(info.key))) as archive:
        names = sorted(archive.namelist())
        assert names == ["img-1.png", "img-1.txt", "img-2.png", "img-2.txt", "img-3.png", "img-3.txt"]
        assert archive.read("img-2.txt").decode() == "ohwx, a plastic bottle\n"
        assert archive.read("img-1.png") == dataset.get_bytes(f"datasets/{DATASET}/images/img-1.png")
    # the same version exports to the same bytes; repeats give kohya's "<repeats>_<trigger>" folder
    assert review.export_zip(dataset, DATASET)[1].sha256 == info.sha256
    _, folder = review.export_zip(dataset, DATASET, version=1, repeats=10)
    with zipfile.ZipFile(io.BytesIO(dataset.get_bytes(folder.key))) as archive:
        assert "10_ohwx/img-1.txt" in archive.namelist()


def test_version_documents_are_self_describing(dataset) -> None:
    doc = json.loads(dataset.get_bytes(version_key(DATASET, 1)))
    assert doc["format"] == "fluxlora-captions/1"
    assert set(doc) >= {"version", "parent", "kind", "trigger_word", "captions", "created_at", "author",
                        "comment", "approved", "changed_stems", "sha256"}
    assert doc["created_at"].endswith("Z")


def test_an_export_zip_never_unpacks_outside_its_folder(tmp_path) -> None:
    from fluxlora.captioning.export import write_kohya_zip
    from fluxlora_client.exports import extract_kohya_zip

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("../escape.txt", "x")
    with pytest.raises(ValueError, match="unsafe entry '../escape.txt'"):
        extract_kohya_zip(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(ValueError, match="captions without an image: b; images without a caption: c"):
        write_kohya_zip({"a": tmp_path / "a.png", "c": tmp_path / "c.png"}, {"a": "x", "b": "y"}, tmp_path / "o.zip")
