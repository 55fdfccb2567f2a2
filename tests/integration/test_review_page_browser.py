"""The caption review page in a real browser (headless Chromium over CDP), as a reviewer uses it:
`fluxlora caption review` writes the page; every image shows beside its caption; the reviewer types
two new captions (seeing the trigger warning while one lacks the trigger), is asked before leaving
with edits not downloaded, presses Download edits and is shown the import command; `fluxlora caption
import-review` stores exactly those two edits as the next caption version."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from fluxlora.captioning.cleaning import count_trigger
from support import fluxlora, run_main
from support_browser import HeadlessBrowser, chromium

TRIGGER = "fluxone"

CARDS = """Array.from(document.querySelectorAll(".card")).map(card => ({
    stem: card.dataset.stem,
    caption: card.querySelector("textarea").value,
    trigger: card.querySelector(".trigger-count").textContent,
    warned: card.querySelector(".trigger-count").classList.contains("bad"),
    changed: card.classList.contains("changed"),
}))"""

# Each image scrolled into view (the page loads them lazily) and decoded, as the reviewer sees it.
IMAGES = """(async () => {
    const shown = {};
    for (const card of document.querySelectorAll(".card")) {
        const img = card.querySelector("img");
        img.scrollIntoView();
        if (!img.complete) await new Promise(done => { img.onload = img.onerror = done; });
        await img.decode();
        shown[card.dataset.stem] = [img.naturalWidth, img.naturalHeight, img.getBoundingClientRect().width];
    }
    return shown;
})()"""


def status(browser) -> str:
    return browser.evaluate("document.getElementById('status').textContent")


def card(browser, stem: str) -> dict:
    return next(c for c in browser.evaluate(CARDS) if c["stem"] == stem)


@pytest.fixture(scope="session")
def browser_executable() -> str:
    """Asked for first, so a machine without a browser skips (CI: fails) before any captioning work."""
    return chromium()


def test_a_reviewer_edits_two_captions_in_the_browser_and_imports_the_download(
        browser_executable, cli_env, photos, tiny_models, tmp_path, monkeypatch, capsys):
    client = cli_env
    dataset_id = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64))).dataset_id
    captioned = fluxlora("caption", dataset_id, "--trigger", TRIGGER, "--model", str(tiny_models["florence2"]))
    assert captioned.exit_code == 0, captioned.output
    listing = client.captions.list(dataset_id)
    before = {e.stem: e.caption for e in listing.entries}
    sizes = {e.stem: Image.open(io.BytesIO(client.store.get_bytes(e.image_key))).size for e in listing.entries}
    first, third = listing.entries[0].stem, listing.entries[2].stem

    page = tmp_path / "review.html"
    code, output = run_main(monkeypatch, capsys, "caption", "review", dataset_id, "--out", str(page))
    assert code == 0 and page.exists(), output

    with HeadlessBrowser(downloads=tmp_path / "downloads", executable=browser_executable) as browser:
        browser.open(page.as_uri())

        # every image, decoded at its stored size and laid out, beside its caption in the same card
        assert [(c["stem"], c["caption"], c["trigger"], c["warned"], c["changed"]) for c in browser.evaluate(CARDS)] \
            == [(stem, caption, "trigger once", False, False) for stem, caption in before.items()]
        shown = browser.evaluate(IMAGES)
        assert {stem: tuple(size[:2]) for stem, size in shown.items()} == sizes
        assert all(size[2] > 0 for size in shown.values())
        assert status(browser) == "0 changed, 0 without the trigger exactly once"

        # a caption typed without the trigger is flagged on its card and in the header as it is typed ...
        browser.type_into(f'textarea[data-stem="{first}"]', "a brown bottle on a wooden table")
        assert card(browser, first) | {"caption": ""} == {"stem": first, "caption": "", "trigger": "trigger 0 times",
                                                         "warned": True, "changed": True}
        assert status(browser) == "1 changed, 1 without the trigger exactly once"
        # ... and the warning goes once it is fixed; a second caption, typed over two lines
        browser.type_into(f'textarea[data-stem="{first}"]', f"{TRIGGER}, a brown bottle on a wooden table")
        browser.type_into(f'textarea[data-stem="{third}"]', f"{TRIGGER}, a glass jar\nin  soft light ")
        assert [(c["trigger"], c["warned"], c["changed"]) for c in browser.evaluate(CARDS)] == [
            ("trigger once", False, c["stem"] in (first, third)) for c in browser.evaluate(CARDS)]
        assert status(browser) == "2 changed, 0 without the trigger exactly once"

        # closing the tab now would lose the edits: the page asks first, and staying keeps them
        assert browser.leave() is True
        assert card(browser, third)["caption"] == f"{TRIGGER}, a glass jar\nin  soft light "

        browser.click("#download")
        saved = browser.wait_for_download()
        assert browser.evaluate("document.getElementById('next-step').textContent") == (
            f"Saved {saved.name}: import it with  fluxlora caption import-review {dataset_id} {saved.name}")
        assert browser.errors == []  # no uncaught exception, console.error or error log entry
        assert browser.leave() is False  # downloaded: nothing to lose

    assert saved.name == f"{dataset_id}-v1-edits.json"
    edits = {first: f"{TRIGGER}, a brown bottle on a wooden table", third: f"{TRIGGER}, a glass jar in soft light"}
    assert json.loads(saved.read_text(encoding="utf-8")) == {
        "format": "fluxlora-caption-edits/1", "dataset_id": dataset_id, "base_version": 1, "captions": edits}

    code, output = run_main(monkeypatch, capsys, "caption", "import-review", dataset_id, str(saved))
    assert code == 0 and "import-review: 2 caption(s) changed -> version 2" in output, output
    after = client.captions.list(dataset_id)
    assert after.version.version == 2 and after.version.parent == 1 and after.version.comment == "review page"
    assert sorted(after.version.changed_stems) == sorted(edits)
    assert {e.stem: e.caption for e in after.entries} == {**before, **edits}
    assert all(e.trigger_count == 1 and count_trigger(e.caption, TRIGGER) == 1 for e in after.entries)
