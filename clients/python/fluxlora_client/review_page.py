"""A self-contained HTML page for reviewing captions by eye, and reading back what it produced.

The page holds every image (inline, as data: URIs, so it works offline and can be mailed) beside
an editable caption. It counts the trigger word in each caption as the reviewer types, marks the
captions they changed, asks before the tab is closed with edits not yet downloaded, and its
"Download edits" button saves a JSON file of just those (then shows the command that imports it):

    {"format": "fluxlora-caption-edits/1", "dataset_id": "ds-...", "base_version": 3,
     "captions": {"<stem>": "<new caption>", ...}}

`parse_edits` checks such a file; the SDK's import_review stores it as a new caption version made
against base_version, so edits made meanwhile to other captions are kept and conflicting ones refused.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

PAGE_FORMAT = "fluxlora-caption-review/1"
EDITS_FORMAT = "fluxlora-caption-edits/1"


@dataclass(frozen=True)
class ReviewItem:
    stem: str
    caption: str
    image_src: str  # a data: URI (or any URL the browser can load)
    # Shown under the caption, read-only: for an edit instruction, what the captioner saw before and after.
    note: str = ""


@dataclass(frozen=True)
class ReviewEdits:
    dataset_id: str
    base_version: int
    captions: dict[str, str]


def image_data_uri(path: Path, max_side: int = 512) -> str:
    """The image as a data: URI, scaled down so its longer side is at most max_side (0: as it is).

    Thumbnails are JPEG (a 50-image page stays a few MB); images with transparency stay PNG.
    """
    path = Path(path)
    if max_side <= 0:
        mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    with Image.open(path) as image:
        image.load()
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        if image.mode in ("RGBA", "LA") or "transparency" in image.info:
            image.convert("RGBA").save(buffer, "PNG")
            mime = "image/png"
        else:
            image.convert("RGB").save(buffer, "JPEG", quality=85)
            mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def render_review_page(dataset_id: str, base_version: int, trigger_word: str, items: Sequence[ReviewItem]) -> str:
    data = {
        "format": PAGE_FORMAT,
        "dataset_id": dataset_id,
        "base_version": base_version,
        "trigger_word": trigger_word,
        "captions": {item.stem: item.caption for item in items},
    }
    # "</" inside a script element would end it early: escape it in the embedded JSON.
    payload = json.dumps(data, ensure_ascii=False, indent=1).replace("</", "<\\/")
    cards = "\n".join(_card(item) for item in items)
    title = html.escape(f"Captions of {dataset_id}, version {base_version}")
    return _PAGE.format(
        title=title,
        dataset=html.escape(dataset_id),
        version=base_version,
        trigger=html.escape(trigger_word),
        count=len(items),
        cards=cards,
        data=payload,
        script=_SCRIPT,
    )


def parse_edits(data: object, dataset_id: str | None = None) -> ReviewEdits:
    """Check an edits file's content; ValueError says what is wrong and how to get a good one."""
    if not isinstance(data, dict) or data.get("format") != EDITS_FORMAT:
        raise ValueError(
            f"not a caption edits file (expected \"format\": \"{EDITS_FORMAT}\"): save it with the review "
            "page's Download edits button"
        )
    found_id = data.get("dataset_id")
    if not isinstance(found_id, str) or not found_id:
        raise ValueError("the edits file names no dataset_id")
    if dataset_id is not None and found_id != dataset_id:
        raise ValueError(f"the edits are for dataset {found_id!r}, not {dataset_id!r}")
    base = data.get("base_version")
    if not isinstance(base, int) or isinstance(base, bool) or base < 1:
        raise ValueError(f"the edits file's base_version must be a version number, got {base!r}")
    captions = data.get("captions")
    if not isinstance(captions, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in captions.items()
    ):
        raise ValueError('the edits file\'s "captions" must map image stems to caption text')
    return ReviewEdits(found_id, base, dict(captions))


def _card(item: ReviewItem) -> str:
    stem = html.escape(item.stem, quote=True)
    return (
        f'<figure class="card" data-stem="{stem}">'
        f'<img src="{html.escape(item.image_src, quote=True)}" alt="{stem}" loading="lazy">'
        f"<figcaption><span class=\"stem\">{stem}</span> <span class=\"trigger-count\"></span></figcaption>"
        f'<textarea data-stem="{stem}" rows="5" spellcheck="true">{html.escape(item.caption)}</textarea>'
        + (f'<p class="note">{html.escape(item.note)}</p>' if item.note else "")
        + "</figure>"
    )


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; background: #f4f4f5; color: #18181b; }}
header {{ position: sticky; top: 0; background: #fff; border-bottom: 1px solid #d4d4d8; padding: .75rem 1rem;
  display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; z-index: 1; }}
header h1 {{ font-size: 1.1rem; margin: 0; }}
#status, #next-step {{ color: #52525b; }}
#next-step {{ flex-basis: 100%; font-family: ui-monospace, monospace; }}
#next-step:empty {{ display: none; }}
button {{ font-size: 1rem; padding: .4rem .9rem; border-radius: .4rem; border: 1px solid #2563eb;
  background: #2563eb; color: #fff; cursor: pointer; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1rem; padding: 1rem; }}
.card {{ margin: 0; background: #fff; border: 1px solid #d4d4d8; border-radius: .5rem; padding: .5rem;
  display: flex; flex-direction: column; gap: .4rem; }}
.card img {{ width: 100%; max-height: 360px; object-fit: contain; background: #e4e4e7; border-radius: .3rem; }}
.card textarea {{ width: 100%; box-sizing: border-box; font: inherit; resize: vertical; }}
.card.changed {{ border-color: #2563eb; box-shadow: 0 0 0 2px #bfdbfe; }}
.stem {{ font-family: ui-monospace, monospace; }}
.note {{ margin: 0; color: #52525b; font-size: .9rem; white-space: pre-line; }}
.trigger-count.bad {{ color: #b91c1c; font-weight: 600; }}
</style>
</head>
<body>
<header>
<h1>{dataset} &middot; version {version} &middot; trigger <code>{trigger}</code> &middot; {count} images</h1>
<span id="status"></span>
<button type="button" id="download">Download edits</button>
<span id="next-step"></span>
</header>
<main>
{cards}
</main>
<script type="application/json" id="fluxlora-review-data">
{data}
</script>
<script id="fluxlora-review-app">
{script}
</script>
</body>
</html>
"""

_SCRIPT = r"""
"use strict";
// Pure helpers first (tests run them in node); the page wiring only runs in a browser.
function escapeRegExp(text) { return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }
function countTrigger(text, trigger) {
  // As fluxlora's count_trigger: whole tokens, "-" counts as part of a word, any case.
  const pattern = new RegExp("(?<![\\p{L}\\p{N}_-])" + escapeRegExp(trigger) + "(?![\\p{L}\\p{N}_-])", "giu");
  return (text.match(pattern) || []).length;
}
function normalizeSpace(text) { return text.split(/\s+/).filter(Boolean).join(" "); }
function buildEdits(data, values) {
  const captions = {};
  for (const stem of Object.keys(data.captions)) {
    if (!(stem in values)) continue;
    const text = normalizeSpace(values[stem]);
    if (text !== normalizeSpace(data.captions[stem])) captions[stem] = text;
  }
  return {format: "fluxlora-caption-edits/1", dataset_id: data.dataset_id,
          base_version: data.base_version, captions: captions};
}
if (typeof module !== "undefined") module.exports = {countTrigger, buildEdits};
if (typeof document !== "undefined") {
  const data = JSON.parse(document.getElementById("fluxlora-review-data").textContent);
  const areas = Array.from(document.querySelectorAll("textarea[data-stem]"));
  const values = () => Object.fromEntries(areas.map(a => [a.dataset.stem, a.value]));
  function refresh() {
    for (const area of areas) {
      const card = area.closest(".card");
      const n = countTrigger(area.value, data.trigger_word);
      const label = card.querySelector(".trigger-count");
      label.textContent = n === 1 ? "trigger once" : `trigger ${n} times`;
      label.classList.toggle("bad", n !== 1);
      card.classList.toggle("changed", normalizeSpace(area.value) !== normalizeSpace(data.captions[area.dataset.stem]));
    }
    const edits = buildEdits(data, values());
    const bad = areas.filter(a => countTrigger(a.value, data.trigger_word) !== 1).length;
    document.getElementById("status").textContent =
      `${Object.keys(edits.captions).length} changed, ${bad} without the trigger exactly once`;
  }
  // The edits last downloaded: leaving the page with others asks first (they live only in this tab).
  let downloaded = "{}";
  const unsaved = () => {
    const captions = JSON.stringify(buildEdits(data, values()).captions);
    return captions !== "{}" && captions !== downloaded;
  };
  window.addEventListener("beforeunload", event => {
    if (unsaved()) { event.preventDefault(); event.returnValue = ""; }
  });
  areas.forEach(a => a.addEventListener("input", refresh));
  document.getElementById("download").addEventListener("click", () => {
    const edits = buildEdits(data, values());
    const blob = new Blob([JSON.stringify(edits, null, 1)], {type: "application/json"});
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `${data.dataset_id}-v${data.base_version}-edits.json`;
    link.click();
    URL.revokeObjectURL(link.href);
    downloaded = JSON.stringify(edits.captions);
    document.getElementById("next-step").textContent =
      `Saved ${link.download}: import it with  fluxlora caption import-review ${data.dataset_id} ${link.download}`;
  });
  refresh();
}
"""
