"""A dataset's captions as an append-only history of immutable versions in the store.

    datasets/<id>/captions/v0001.json   {"version": 1, "parent": 0, "kind": "auto", "captions": {...}, ...}
    datasets/<id>/captions/v0002.json   an edit of v0001
    datasets/<id>/captions/v0003.json   v0002 approved

Every change (a caption job, an edit, a find/replace, an approval) writes the next version; none is
ever rewritten, so any earlier set of captions can be read back. Each version records its parent,
who made it and why, which captions changed, and a SHA-256 of its trigger word and captions, which
`get` checks, so a damaged version is reported rather than trained on.

Writers in one process take turns under a per-dataset lock. Across processes and replicas a version
number is claimed with a create-only write (ArtifactStore.create_bytes: a hard link on a local
directory, a conditional PUT on S3), so two writers never store the same number: the one that loses
re-reads the listing and takes the next. A change computed from the latest version (an edit, a
find/replace) names that version (expect_head) and is recomputed when another writer got in first, so
it never silently undoes the other change. Each claimed version is read back too: on an S3 server
that ignored the condition, a replacement already made is then noticed and the version rewritten
under the next number (one made after the read-back would still be lost: use a server with
conditional writes: AWS S3, MinIO since 2024, Ceph).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from fluxlora.common import keys
from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import FailedPrecondition, NotFound, Unavailable

FORMAT = "fluxlora-captions/1"
KINDS = ("auto", "import", "legacy", "edit", "replace", "approve")
_VERSION_NAME = re.compile(r"v(\d+)\.json$")
# Each lost claim means another version was stored meanwhile: this many in a row is a storm of writers.
MAX_CLAIMS = 50

_locks: dict[tuple[str, str], threading.RLock] = {}
_locks_guard = threading.Lock()


def versions_prefix(dataset_id: str) -> str:
    return f"{keys.dataset_prefix(dataset_id)}captions/"


def version_key(dataset_id: str, version: int) -> str:
    return f"{versions_prefix(dataset_id)}v{version:04d}.json"


def content_hash(trigger_word: str, captions: Mapping[str, str]) -> str:
    canonical = json.dumps({"captions": dict(captions), "trigger_word": trigger_word}, sort_keys=True,
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class HeadMoved(FailedPrecondition):
    """Another writer stored a version after the one a change was computed from."""


@dataclass(frozen=True)
class CaptionVersion:
    version: int
    parent: int
    kind: str
    trigger_word: str
    captions: dict[str, str]
    created_at: str
    author: str = ""
    comment: str = ""
    approved: bool = False
    changed_stems: list[str] = field(default_factory=list)
    # What made it: captioner settings for "auto", the find/replace for "replace", ...
    source: dict = field(default_factory=dict)
    sha256: str = ""

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, key: str) -> CaptionVersion:
        if data.get("format") != FORMAT:
            raise FailedPrecondition(f"caption version {key!r} is not a {FORMAT} document")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        version = cls(**fields)
        if content_hash(version.trigger_word, version.captions) != version.sha256:
            raise FailedPrecondition(
                f"caption version {key!r} does not match its sha256: it was changed or damaged in the store; "
                "approve another version or caption the dataset again"
            )
        return version


class CaptionVersions:
    """The caption versions of one dataset."""

    def __init__(self, store: ArtifactStore, dataset_id: str):
        self.store = store
        self.dataset_id = dataset_id

    def locked(self) -> threading.RLock:
        """Held across read-check-append, so a check of the latest version still holds when writing."""
        return _lock(self.store, self.dataset_id)

    def numbers(self) -> list[int]:
        found = []
        for info in self.store.list(versions_prefix(self.dataset_id)):
            match = _VERSION_NAME.search(info.key.rsplit("/", 1)[-1])
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def get(self, version: int) -> CaptionVersion:
        key = version_key(self.dataset_id, version)
        if not self.store.exists(key):
            have = self.numbers()
            listing = f"it has versions 1 to {have[-1]}" if have else "it has no caption versions yet"
            raise NotFound(f"dataset {self.dataset_id!r} has no caption version {version}: {listing}")
        return CaptionVersion.from_json(self.store.get_json(key), key)

    def head(self) -> CaptionVersion | None:
        numbers = self.numbers()
        return self.get(numbers[-1]) if numbers else None

    def history(self) -> list[CaptionVersion]:
        return [self.get(n) for n in self.numbers()]

    def latest_approved(self) -> CaptionVersion | None:
        for n in reversed(self.numbers()):
            version = self.get(n)
            if version.approved:
                return version
        return None

    def append(self, *, parent: int, kind: str, trigger_word: str, captions: Mapping[str, str],
               author: str = "", comment: str = "", approved: bool = False, source: dict | None = None,
               changed_stems: list[str] | None = None, expect_head: int | None = None) -> CaptionVersion:
        """Store the next version. changed_stems defaults to the difference from the parent.

        expect_head: the latest version when the captions were computed (0: there was none); if
        another writer has stored one since, HeadMoved is raised and nothing is stored.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown caption version kind {kind!r}; one of {', '.join(KINDS)}")
        captions = {stem: captions[stem] for stem in sorted(captions)}
        with _lock(self.store, self.dataset_id):
            if changed_stems is None:
                before = self.get(parent).captions if parent else {}
                changed_stems = diff_stems(before, captions)
            for _ in range(MAX_CLAIMS):
                numbers = self.numbers()
                latest = numbers[-1] if numbers else 0
                if expect_head is not None and latest != expect_head:
                    raise HeadMoved(
                        f"dataset {self.dataset_id!r} got caption version {latest} while this change was "
                        f"made from version {expect_head}: look at the latest captions and make it again"
                    )
                version = CaptionVersion(
                    version=latest + 1,
                    parent=parent,
                    kind=kind,
                    trigger_word=trigger_word,
                    captions=captions,
                    created_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    author=author,
                    comment=comment,
                    approved=approved,
                    changed_stems=sorted(changed_stems),
                    source=dict(source or {}),
                    sha256=content_hash(trigger_word, captions),
                )
                if self._claim(version):
                    return version
        raise Unavailable(
            f"could not store a caption version of dataset {self.dataset_id!r}: {MAX_CLAIMS} other versions "
            "were stored while trying; retry when the other writers are done"
        )

    def _claim(self, version: CaptionVersion) -> bool:
        """Store version under its number unless another writer has it; True when stored."""
        key = version_key(self.dataset_id, version.version)
        data = json.dumps(version.to_json(), indent=2, sort_keys=True).encode()
        if not self.store.create_bytes(key, data, "application/json"):
            return False
        # The read-back: an S3 server that ignores If-None-Match lets a second writer replace ours.
        return self.store.get_bytes(key) == data


def diff_stems(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Stems added, removed or changed between two caption sets."""
    return sorted(s for s in set(before) | set(after) if before.get(s) != after.get(s))


def _lock(store: ArtifactStore, dataset_id: str) -> threading.RLock:
    key = (store.uri, dataset_id)
    with _locks_guard:
        return _locks.setdefault(key, threading.RLock())
