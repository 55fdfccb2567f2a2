"""Caption review over gRPC, through the SDK, on both stores: auto-caption, list with images,
edit, find/replace, history, approve (what training reads), review page and export; and the
statuses bad inputs get."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
import zipfile
from html.parser import HTMLParser

import pytest

from fluxlora.captioning.cleaning import count_trigger
from fluxlora.common.storage import LocalStore
from fluxlora_client import FluxloraClientError
from support import services_and_client

TRIGGER = "fluxone"


@pytest.fixture
def captioned(running, photos, tiny_models):
    """A preprocessed dataset auto-captioned by the tiny Florence-2 (version 1)."""
    client = running
    dataset_id = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64))).dataset_id
    job = client.wait(client.caption(dataset_id, TRIGGER, model=str(tiny_models["florence2"]), max_new_tokens=12))
    return client, dataset_id, client.result(job)


@pytest.fixture
def local_captioned(tmp_path, photos, tiny_models):
    """As `captioned`, on a local store only: for checks that do not depend on the backend."""
    with services_and_client(LocalStore(tmp_path / "store"), tmp_path) as client:
        source = client.upload_photos(photos)
        dataset_id = client.result(client.wait(client.preprocess(source, base_size=64))).dataset_id
        client.wait(client.caption(dataset_id, TRIGGER, model=str(tiny_models["florence2"]), max_new_tokens=12))
        yield client, dataset_id


def status_of(call) -> tuple[str, str]:
    with pytest.raises(FluxloraClientError) as err:
        call()
    return err.value.code, err.value.message


def test_the_review_round_trip(captioned):
    client, dataset_id, result = captioned
    review = client.captions
    assert result.version == 1

    # list: every image with its caption, key and a URL that downloads it
    listing = review.list(dataset_id, include_urls=True)
    assert (listing.version.version, listing.version.kind, listing.head_version, listing.approved_version) == (
        1, "auto", 1, 0)
    stems = [e.stem for e in listing.entries]
    assert len(stems) == 4
    first = listing.entries[0]
    assert first.image_key == f"datasets/{dataset_id}/images/{first.stem}.png"
    assert all(e.trigger_count == 1 for e in listing.entries)
    with urllib.request.urlopen(first.image_url) as response:
        assert response.read() == client.store.get_bytes(first.image_key)

    # edit one caption: version 2; the trigger twice is allowed in a draft but warned about
    edited = review.edit(dataset_id, {stems[0]: f"{TRIGGER}, a green bottle with {TRIGGER}"}, author="ana")
    assert edited.created and edited.version.version == 2 and list(edited.changed_stems) == [stems[0]]
    assert any("2 times" in w for w in edited.warnings)

    # bulk find/replace: how many captions changed, as version 3
    replaced = review.replace(dataset_id, "green", "blue", author="ana")
    assert replaced.version.version == 3 and list(replaced.changed_stems) == [stems[0]]

    # history: every version with its parent, kind and author; earlier versions stay readable
    history = review.history(dataset_id)
    assert [(v.version, v.parent, v.kind) for v in history.versions] == [(1, 0, "auto"), (2, 1, "edit"),
                                                                      (3, 2, "replace")]
    assert history.versions[1].author == "ana" and history.versions[0].author.startswith("cap-")
    assert {e.stem: e.caption for e in review.list(dataset_id, version=1).entries}[stems[0]] == \
        {e.stem: e.caption for e in listing.entries}[stems[0]]

    # approving refuses the caption with the trigger twice, naming it
    code, message = status_of(lambda: review.approve(dataset_id))
    assert code == "FAILED_PRECONDITION" and f"{stems[0]} (2 times)" in message
    assert client.store.get_json(f"datasets/{dataset_id}/captions.json")["approved_version"] is None

    # fix it, approve: version 4 is what training reads, sidecars and captions.json alike
    review.edit(dataset_id, {stems[0]: f"{TRIGGER}, a blue bottle"})
    approved = review.approve(dataset_id, comment="checked by eye")
    assert approved.created and approved.version.approved and approved.version.version == 5
    published = client.store.get_json(f"datasets/{dataset_id}/captions.json")
    assert published["approved_version"] == 5 and published["trigger_word"] == TRIGGER
    final = review.list(dataset_id)
    assert final.approved_version == 5
    for entry in final.entries:
        sidecar = client.store.get_bytes(f"datasets/{dataset_id}/images/{entry.stem}.txt").decode()
        assert sidecar == entry.caption + "\n" == published["captions"][entry.stem] + "\n"
        assert count_trigger(sidecar, TRIGGER) == 1
    assert published["captions"][stems[0]] == f"{TRIGGER}, a blue bottle"


def test_approve_can_fix_triggers_and_export_gives_kohya_pairs(captioned, tmp_path):
    client, dataset_id, _ = captioned
    stems = [e.stem for e in client.captions.list(dataset_id).entries]
    client.captions.edit(dataset_id, {stems[0]: "a bottle", stems[1]: f"{TRIGGER} and {TRIGGER.upper()}"})
    approved = client.captions.approve(dataset_id, fix_triggers=True)
    assert sorted(approved.changed_stems) == sorted(stems[:2])
    assert all(count_trigger(c, TRIGGER) == 1 for c in client.store.get_json(
        f"datasets/{dataset_id}/captions.json")["captions"].values())

    folder = client.captions.export(dataset_id, tmp_path / "kohya")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([f"{s}.png" for s in stems] + [f"{s}.txt" for s in stems])
    assert (folder / f"{stems[0]}.txt").read_text() == f"{TRIGGER}, a bottle\n"
    zipped = client.captions.export(dataset_id, tmp_path / "zips", as_zip=True, repeats=10)
    with zipfile.ZipFile(zipped) as archive:
        assert f"10_{TRIGGER}/{stems[0]}.txt" in archive.namelist()


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.textareas, self.images, self.scripts, self._in = {}, {}, {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "textarea":
            self._in = (self.textareas, attrs["data-stem"])
        elif tag == "script":
            self._in = (self.scripts, attrs["id"])
        elif tag == "img":
            self.images[attrs["alt"]] = attrs["src"]
        if self._in:
            self._in[0].setdefault(self._in[1], "")

    def handle_endtag(self, tag):
        if tag in ("textarea", "script"):
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._in[0][self._in[1]] += data


def test_the_html_review_page_round_trip(local_captioned, tmp_path):
    client, dataset_id = local_captioned
    page = client.captions.write_review_page(dataset_id, tmp_path / "review.html", image_size=32)
    parsed = _Page()
    parsed.feed(page.read_text(encoding="utf-8"))
    listing = client.captions.list(dataset_id)
    assert parsed.textareas == {e.stem: e.caption for e in listing.entries}
    assert set(parsed.images) == set(parsed.textareas)
    assert all(src.startswith("data:image/") for src in parsed.images.values())

    # the reviewer changes one caption; the page's own script builds the edits file where node is at hand
    stem = listing.entries[1].stem
    values = dict(parsed.textareas, **{stem: f"{TRIGGER}, a bottle on a shelf"})
    data = json.loads(parsed.scripts["fluxlora-review-data"])
    if shutil.which("node"):
        script = tmp_path / "app.js"
        script.write_text(parsed.scripts["fluxlora-review-app"], encoding="utf-8")
        program = (f"const app = require({json.dumps(str(script))});"
                   f"console.log(JSON.stringify(app.buildEdits({json.dumps(data)}, {json.dumps(values)})));")
        edits = json.loads(subprocess.run(["node", "-e", program], capture_output=True, text=True, check=True,
                                          timeout=60).stdout)
    else:
        edits = {"format": "fluxlora-caption-edits/1", "dataset_id": dataset_id,
                 "base_version": data["base_version"], "captions": {stem: values[stem]}}
    assert edits["captions"] == {stem: f"{TRIGGER}, a bottle on a shelf"}
    edits_file = tmp_path / "edits.json"
    edits_file.write_text(json.dumps(edits))

    # meanwhile someone else edits another caption: the import keeps their edit
    other = listing.entries[0].stem
    client.captions.edit(dataset_id, {other: f"{TRIGGER}, someone else's edit"})
    change = client.captions.import_review(dataset_id, edits_file)
    assert change.created and change.version.version == 3 and list(change.changed_stems) == [stem]
    assert change.version.comment == "review page"
    now = {e.stem: e.caption for e in client.captions.list(dataset_id).entries}
    assert now[stem] == f"{TRIGGER}, a bottle on a shelf" and now[other] == f"{TRIGGER}, someone else's edit"

    # the same page imported again after a newer edit of that caption is refused, not overwriting it
    client.captions.edit(dataset_id, {stem: f"{TRIGGER}, newest"})
    code, message = status_of(lambda: client.captions.import_review(dataset_id, edits_file))
    assert code == "FAILED_PRECONDITION" and stem in message and "changed after version 1" in message
    code, message = status_of(lambda: client.captions.import_review("ds-other", edits_file))
    assert code == "INVALID_ARGUMENT" and "not 'ds-other'" in message


def test_captions_uploaded_with_the_photos_are_imported(running, photos, tmp_path):
    client = running
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    names = sorted(p.name for p in folder.iterdir())
    rows = [f'{names[0]},"{TRIGGER} bottle on a table, {TRIGGER}"']  # the trigger twice
    rows += [f"{name},a bottle, studio light, bottle" for name in names[1:]]
    rows.append("not-uploaded.jpg,a caption for a photo that is not there")
    (folder / "captions.csv").write_text("file,caption\n" + "\n".join(rows) + "\n")
    dataset_id = client.result(client.wait(client.preprocess(client.upload_photos(folder), base_size=64))).dataset_id

    job = client.wait(client.caption(dataset_id, TRIGGER, captioner="import", style="tags",
                                     remove_phrases=["bottle"]))
    result = client.result(job)
    assert result.version == 1 and result.removed_phrase_counts["bottle"] == len(names)
    listing = client.captions.list(dataset_id)
    assert listing.version.kind == "import"
    captions = [e.caption for e in listing.entries]
    # cleaning fixed the trigger-twice caption to hold it once, first, as tags
    assert captions[0] == f"{TRIGGER}, on a table"
    assert captions[1:] == [f"{TRIGGER}, studio light"] * (len(names) - 1)
    assert any("not-uploaded" in w and "matches no image" in w for w in job.warnings)
    assert client.captions.approve(dataset_id).version.approved


def test_captions_inside_an_uploaded_zip_are_imported(running, photos, tmp_path):
    client = running
    names = sorted(p.name for p in photos.iterdir())
    stems = [name.rsplit(".", 1)[0] for name in names]
    upload = tmp_path / "photos.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for name in names:
            archive.write(photos / name, f"shoot/{name}")
        for stem in stems[:2]:  # kohya sidecars beside their photos ...
            archive.writestr(f"shoot/{stem}.txt", f"a bottle called {stem}")
        archive.writestr("captions.jsonl", "".join(  # ... and a jsonl at the zip's root for the rest
            json.dumps({"file": f"shoot/{name}", "caption": f"{TRIGGER}, a jar"}) + "\n" for name in names[2:]))
    dataset_id = client.result(client.wait(client.preprocess(client.upload_photos(upload), base_size=64))).dataset_id
    assert [k for k in (o.key for o in client.store.list(f"datasets/{dataset_id}/raw/"))] == [
        f"datasets/{dataset_id}/raw/photos.zip"]  # stored whole: the captions are only inside it

    result = client.result(client.wait(client.caption(dataset_id, TRIGGER, captioner="import")))
    assert result.caption_count == len(names)
    captions = {e.stem: e.caption for e in client.captions.list(dataset_id).entries}
    assert captions == {**{s: f"{TRIGGER}, a bottle called {s}" for s in stems[:2]},
                        **{s: f"{TRIGGER}, a jar" for s in stems[2:]}}

    # a zip of sidecars named as the photos are (not as their path inside the photos' zip) works too
    more = tmp_path / "captions.zip"
    with zipfile.ZipFile(more, "w") as archive:
        for stem in stems:
            archive.writestr(f"{stem}.txt", "a glass bottle")
    client.store.put_file("uploads/more/captions.zip", more)
    job = client.wait(client.caption(dataset_id, TRIGGER, captioner="import",
                                     captions_source="uploads/more/captions.zip"))
    assert client.result(job).version == 2
    assert {e.caption for e in client.captions.list(dataset_id).entries} == {f"{TRIGGER}, a glass bottle"}


def test_bad_inputs_get_clear_statuses(local_captioned, tiny_models):
    client, dataset_id = local_captioned
    model = str(tiny_models["florence2"])
    stem = client.captions.list(dataset_id).entries[0].stem
    cases = [
        (lambda: client.caption(dataset_id, "", model=model), "INVALID_ARGUMENT", "trigger word is empty"),
        (lambda: client.caption(dataset_id, "   ", model=model), "INVALID_ARGUMENT", "trigger word is empty"),
        (lambda: client.caption(dataset_id, TRIGGER, model=model, style="prose"), "INVALID_ARGUMENT", "spec.style"),
        (lambda: client.caption(dataset_id, TRIGGER, model=model, captioner="blip", task="<DETAILED_CAPTION>"),
         "INVALID_ARGUMENT", "takes none"),
        (lambda: client.caption(dataset_id, TRIGGER, captioner="import", captions_source="uploads/none.csv"),
         "NOT_FOUND", "uploads/none.csv"),
        (lambda: client.caption(dataset_id, TRIGGER, model=model, base_model="/no/such/flux"),
         "NOT_FOUND", "/no/such/flux"),
        (lambda: client.captions.edit(dataset_id, {"no-such-image": "x", stem: "y"}), "NOT_FOUND", "no-such-image"),
        (lambda: client.captions.edit(dataset_id, {}), "INVALID_ARGUMENT", "no captions to edit"),
        (lambda: client.captions.replace(dataset_id, "(", "x", regex=True), "INVALID_ARGUMENT", "regular expression"),
        (lambda: client.captions.list(dataset_id, version=9), "NOT_FOUND", "no caption version 9"),
        (lambda: client.captions.list("ds-missing"), "NOT_FOUND", "ds-missing"),
        (lambda: client.captions.list(""), "INVALID_ARGUMENT", "dataset_id is empty"),
        (lambda: client.captions.export(dataset_id, "unused"), "FAILED_PRECONDITION", "approve a version first"),
    ]
    for call, code, part in cases:
        got_code, message = status_of(call)
        assert (got_code, part in message) == (code, True), message
    assert [v.version for v in client.captions.history(dataset_id).versions] == [1]


def test_the_captioning_model_loads_once_per_process(local_captioned, tiny_models):
    from fluxlora.captioning.job import captioner_loads

    client, dataset_id = local_captioned
    before = captioner_loads()
    for _ in range(2):
        client.wait(client.caption(dataset_id, TRIGGER, model=str(tiny_models["florence2"]), max_new_tokens=12))
    assert captioner_loads() == before
    assert [v.kind for v in client.captions.history(dataset_id).versions] == ["auto"] * 3


def test_blip_captions_a_dataset_through_the_service(local_captioned, tmp_path):
    from fluxlora.models.tiny_blip import write_tiny_blip

    client, dataset_id = local_captioned
    job = client.wait(client.caption(dataset_id, TRIGGER, captioner="blip", model=str(write_tiny_blip(tmp_path / "b")),
                                     max_new_tokens=8))
    assert client.result(job).version == 2
    listing = client.captions.list(dataset_id)
    assert listing.version.kind == "auto" and all(e.trigger_count == 1 for e in listing.entries)


def test_captions_imported_from_an_object_key_are_checked_for_length_and_trigger(local_captioned):
    client, dataset_id = local_captioned
    stems = [e.stem for e in client.captions.list(dataset_id).entries]
    long_caption = " ".join(["glass"] * 100)
    lines = [json.dumps({"file": stem, "caption": long_caption if i == 0 else "a bottle"})
             for i, stem in enumerate(stems)]
    client.store.put_bytes("uploads/captions/mine.jsonl", ("\n".join(lines) + "\n").encode())
    job = client.wait(client.caption(dataset_id, "bottle", captioner="import",
                                     captions_source="uploads/captions/mine.jsonl"))
    result = client.result(job)
    assert result.over_length_count == 1 and not result.exact_token_counts
    [too_long] = [w for w in job.warnings if "CLIP tokens" in w]
    assert repr(stems[0]) in too_long and "estimated" in too_long
    assert any("'bottle' is a common English word" in w for w in job.warnings)
