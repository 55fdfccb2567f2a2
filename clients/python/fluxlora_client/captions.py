"""Caption review in the SDK: `client.captions` lists, edits, finds/replaces, approves, shows the
history of and exports a dataset's captions, and writes / imports the HTML review page.

    review = client.captions
    listing = review.list(dataset_id, include_urls=True)       # captions with their images
    review.edit(dataset_id, {"img-003": "ohwx, a bottle on a beach"})
    review.replace(dataset_id, "plastic", "glass")             # whole words, any case
    review.approve(dataset_id)                                 # training now uses this version
    review.write_review_page(dataset_id, "review.html")        # edit in a browser, then:
    review.import_review(dataset_id, "ds-...-v4-edits.json")
    review.export(dataset_id, "kohya/")                        # <stem>.png + <stem>.txt
"""

from __future__ import annotations

import getpass
import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from fluxlora_api.v1 import captioning_pb2 as pb
from fluxlora_api.v1 import captioning_pb2_grpc
from fluxlora_client.errors import FluxloraClientError
from fluxlora_client.exports import extract_kohya_zip
from fluxlora_client.review_page import ReviewItem, image_data_uri, parse_edits, render_review_page


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in minimal containers
        return ""


class CaptionReview:
    def __init__(self, client) -> None:
        self._client = client
        self._stub = captioning_pb2_grpc.CaptioningServiceStub(client._channel("captioning"))

    def _call(self, name: str, request):
        return self._client._call(getattr(self._stub, name), request)

    def list(self, dataset_id: str, version: int = 0, include_urls: bool = False) -> pb.ListCaptionsResponse:
        """One version's captions (the latest by default) with their image keys (and URLs)."""
        request = pb.ListCaptionsRequest(dataset_id=dataset_id, version=version, include_urls=include_urls)
        return self._call("ListCaptions", request)

    def edit(self, dataset_id: str, captions: Mapping[str, str], base_version: int = 0, author: str | None = None,
             comment: str = "") -> pb.CaptionChange:
        """Change some captions ({stem: caption}); a new version is stored, the old ones stay."""
        request = pb.EditCaptionsRequest(dataset_id=dataset_id, captions=dict(captions), base_version=base_version,
                                         author=_user() if author is None else author, comment=comment)
        return self._call("EditCaptions", request)

    def replace(self, dataset_id: str, find: str, replace: str, *, regex: bool = False, substring: bool = False,
                case_sensitive: bool = False, stems: Iterable[str] = (), base_version: int = 0,
                author: str | None = None, comment: str = "", dry_run: bool = False) -> pb.CaptionChange:
        """Find/replace across captions (whole words, any case, unless told otherwise)."""
        request = pb.ReplaceInCaptionsRequest(
            dataset_id=dataset_id, find=find, replace=replace, regex=regex, substring=substring,
            case_sensitive=case_sensitive, stems=list(stems), base_version=base_version,
            author=_user() if author is None else author, comment=comment, dry_run=dry_run,
        )
        return self._call("ReplaceInCaptions", request)

    def approve(self, dataset_id: str, version: int = 0, *, fix_triggers: bool = False, author: str | None = None,
                comment: str = "") -> pb.CaptionChange:
        """Approve a version (the latest by default): training then uses exactly these captions."""
        request = pb.ApproveCaptionsRequest(dataset_id=dataset_id, version=version, fix_triggers=fix_triggers,
                                            author=_user() if author is None else author, comment=comment)
        return self._call("ApproveCaptions", request)

    def history(self, dataset_id: str) -> pb.CaptionHistory:
        return self._call("GetCaptionHistory", pb.GetCaptionHistoryRequest(dataset_id=dataset_id))

    def export(self, dataset_id: str, dest: str | Path, *, version: int = 0, as_zip: bool = False,
               repeats: int = 0) -> Path:
        """A kohya-style export of a version (the approved one by default): the zip itself into dest
        (a directory) when as_zip, else its <stem>.png + <stem>.txt files unpacked into dest."""
        response = self._call("ExportCaptions", pb.ExportCaptionsRequest(dataset_id=dataset_id, version=version,
                                                                          repeats=repeats))
        dest = Path(dest)
        if as_zip:
            return self._client.download(response.zip_key, dest, service="captioning")[0]
        with tempfile.TemporaryDirectory(prefix="fluxlora-export-") as tmp:
            [zip_path] = self._client.download(response.zip_key, tmp, service="captioning")
            extract_kohya_zip(zip_path, dest)
        return dest

    def write_review_page(self, dataset_id: str, out: str | Path, *, version: int = 0, image_size: int = 512) -> Path:
        """A self-contained HTML page: each image beside its editable caption, and a button that saves
        the edits as JSON for import_review. image_size is the longest thumbnail side (0: full images)."""
        listing = self.list(dataset_id, version)
        items = []
        with tempfile.TemporaryDirectory(prefix="fluxlora-review-") as tmp:
            described = self._descriptions(dataset_id, listing.version.version, Path(tmp) / "version")
            for entry in listing.entries:
                if not entry.image_key:
                    continue  # a caption whose image is gone: approval reports it
                [local] = self._client.download(entry.image_key, tmp, service="captioning")
                seen = described.get(entry.stem) or {}
                note = f"before: {seen.get('before', '')}\nafter: {seen.get('after', '')}" if seen else ""
                items.append(ReviewItem(entry.stem, entry.caption, image_data_uri(local, image_size), note))
        page = render_review_page(dataset_id, listing.version.version, listing.version.trigger_word, items)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        return out

    def _descriptions(self, dataset_id: str, version: int, tmp: Path) -> dict:
        """{stem: {"before": ..., "after": ...}}: what the captioner saw in each before/after pair, kept in
        the caption job's version ("instruction" captions) that `version` descends from; {} for others."""
        versions = {v.version: v for v in self.history(dataset_id).versions}
        while version in versions and versions[version].kind not in ("auto", "import", "legacy"):
            version = versions[version].parent
        if version not in versions or versions[version].kind != "auto":
            return {}
        [path] = self._client.download(versions[version].key, tmp, service="captioning")
        source = json.loads(path.read_text(encoding="utf-8")).get("source") or {}
        described = source.get("descriptions")
        return described if isinstance(described, dict) else {}

    def import_review(self, dataset_id: str, edits: str | Path | Mapping, author: str | None = None,
                      comment: str = "") -> pb.CaptionChange:
        """Store the edits saved from a review page as a new version (made against the page's version)."""
        if isinstance(edits, Mapping):
            data = dict(edits)
        else:
            try:
                data = json.loads(Path(edits).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise FluxloraClientError("INVALID_ARGUMENT", f"cannot read edits file {str(edits)!r}: {exc}") from None
        try:
            parsed = parse_edits(data, dataset_id)
        except ValueError as exc:
            raise FluxloraClientError("INVALID_ARGUMENT", str(exc)) from None
        if not parsed.captions:
            head = self.list(dataset_id)
            return pb.CaptionChange(version=head.version, created=False)
        request = pb.EditCaptionsRequest(
            dataset_id=dataset_id, captions=parsed.captions, base_version=parsed.base_version,
            author=_user() if author is None else author, comment=comment or "review page",
        )
        return self._call("EditCaptions", request)
