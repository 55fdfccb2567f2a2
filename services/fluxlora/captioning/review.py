"""Reviewing a dataset's captions in the store: list, edit, find/replace, approve, export.

Every change stores a new version (versions.py); approving a version also publishes it where the
training service reads captions today: one kohya-style images/<stem>.txt per image and
captions.json (naming the approved version). Training therefore trains on exactly the approved
set; letting a training job ask for an explicit version is left to the training service.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fluxlora.captioning.cleaning import apply_trigger, count_trigger
from fluxlora.captioning.export import kohya_folder_name, write_kohya_zip
from fluxlora.captioning.replace import compile_find, replace_in
from fluxlora.captioning.text_encoders import TokenCounter, length_warnings
from fluxlora.common import keys
from fluxlora.common.limits import check_caption_lengths
from fluxlora.common.storage import ArtifactStore, ObjectInfo
from fluxlora.domain.caption_versions import CaptionVersion, CaptionVersions, HeadMoved
from fluxlora.domain.datasets import require_dataset
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from fluxlora_api.shared.files import sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_RECOMPUTE_TRIES = 5


@dataclass
class Change:
    version: CaptionVersion
    created: bool
    changed_stems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Listing:
    version: CaptionVersion
    entries: list[dict]  # {stem, caption, image_key, image_url, trigger_count}
    head_version: int
    approved_version: int


def image_keys(store: ArtifactStore, dataset_id: str) -> dict[str, str]:
    """{stem: key} of the dataset's training images."""
    prefix = keys.dataset_images(dataset_id)
    found = {}
    for info in store.list(prefix):
        name = info.key[len(prefix):]
        if "/" not in name and name.lower().endswith(IMAGE_SUFFIXES):
            found[name.rsplit(".", 1)[0]] = info.key
    return found


def open_versions(store: ArtifactStore, dataset_id: str) -> CaptionVersions:
    """The dataset's versions; captions made before versions existed become version 1 ("legacy")."""
    require_dataset(store, dataset_id)
    versions = CaptionVersions(store, dataset_id)
    with versions.locked():
        if not versions.numbers() and store.exists(keys.dataset_captions(dataset_id)):
            legacy = store.get_json(keys.dataset_captions(dataset_id))
            try:
                versions.append(parent=0, kind="legacy", trigger_word=legacy.get("trigger_word", ""),
                                captions=legacy.get("captions", {}), author="fluxlora",
                                comment="captions.json from before caption versions", expect_head=0)
            except HeadMoved:  # another replica made version 1 first: one legacy version is enough
                pass
    return versions


def _recomputed_when_head_moves(change):
    """A change made from the latest version is made again from the new latest one when another
    process stored a version in between (inside one process the dataset's lock prevents that)."""

    @functools.wraps(change)
    def recomputed(*args, **kwargs):
        for attempt in range(_RECOMPUTE_TRIES):
            try:
                return change(*args, **kwargs)
            except HeadMoved:
                if attempt == _RECOMPUTE_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    return recomputed


def resolve(versions: CaptionVersions, version: int = 0) -> CaptionVersion:
    if version < 0:
        raise InvalidArgument(f"version must be 0 (the latest) or positive, got {version}")
    if version:
        return versions.get(version)
    head = versions.head()
    if head is None:
        raise FailedPrecondition(f"dataset {versions.dataset_id!r} has no captions yet: run caption first")
    return head


def list_captions(store: ArtifactStore, dataset_id: str, version: int = 0, include_urls: bool = False) -> Listing:
    versions = open_versions(store, dataset_id)
    chosen = resolve(versions, version)
    images = image_keys(store, dataset_id)
    entries = []
    for stem in sorted(set(chosen.captions) | set(images)):
        caption = chosen.captions.get(stem, "")
        key = images.get(stem, "")
        entries.append({
            "stem": stem,
            "caption": caption,
            "image_key": key,
            "image_url": store.presigned_url(key) if include_urls and key else "",
            "trigger_count": count_trigger(caption, chosen.trigger_word) if chosen.trigger_word else 0,
        })
    approved = versions.latest_approved()
    return Listing(chosen, entries, versions.numbers()[-1], approved.version if approved else 0)


def history(store: ArtifactStore, dataset_id: str) -> tuple[list[CaptionVersion], int, int]:
    versions = open_versions(store, dataset_id)
    listed = versions.history()
    approved = [v.version for v in listed if v.approved]
    return listed, listed[-1].version if listed else 0, approved[-1] if approved else 0


@_recomputed_when_head_moves
def edit_captions(store: ArtifactStore, dataset_id: str, edits: Mapping[str, str], *, base_version: int = 0,
                  author: str = "", comment: str = "", kind: str = "edit",
                  counters: Sequence[TokenCounter] = ()) -> Change:
    """Store a version with some captions changed.

    Captions made against base_version are refused when another change has touched one of their
    stems since (FAILED_PRECONDITION naming them), so a slow reviewer never overwrites a newer edit.
    """
    if not edits:
        raise InvalidArgument("no captions to edit: give at least one stem and its new caption")
    edits = {stem: " ".join((text or "").split()) for stem, text in edits.items()}
    versions = open_versions(store, dataset_id)
    images = image_keys(store, dataset_id)
    unknown = sorted(set(edits) - set(images))
    if unknown:
        raise NotFound(
            f"dataset {dataset_id!r} has no image(s) {_names(unknown)} (see ListCaptions for the stems); "
            "captions can only be given for images of the dataset"
        )
    with versions.locked():
        head = resolve(versions)
        if base_version and base_version != head.version:
            base = resolve(versions, base_version)
            conflicts = [s for s in sorted(edits) if base.captions.get(s) != head.captions.get(s)]
            if conflicts:
                raise FailedPrecondition(
                    f"caption(s) {_names(conflicts)} changed after version {base_version} (the latest is "
                    f"{head.version}): reload them and edit again"
                )
        changed = {s: t for s, t in edits.items() if head.captions.get(s) != t}
        if not changed:
            return Change(head, False)
        version = versions.append(parent=head.version, kind=kind, trigger_word=head.trigger_word,
                                  captions={**head.captions, **changed}, author=author, comment=comment,
                                  expect_head=head.version)
    return Change(version, True, sorted(changed), _warnings(version, changed, counters))


@_recomputed_when_head_moves
def replace_in_captions(store: ArtifactStore, dataset_id: str, find: str, replacement: str, *,
                        regex: bool = False, substring: bool = False, case_sensitive: bool = False,
                        stems: Iterable[str] = (), base_version: int = 0, author: str = "", comment: str = "",
                        dry_run: bool = False, counters: Sequence[TokenCounter] = (),
                        max_caption_chars: int = 0) -> Change:
    """max_caption_chars: refuse (INVALID_ARGUMENT) a replacement that makes a caption longer; 0: no limit."""
    try:
        pattern = compile_find(find, regex=regex, substring=substring, case_sensitive=case_sensitive)
    except ValueError as exc:
        raise InvalidArgument(f"find: {exc}") from exc
    stems = list(stems)
    versions = open_versions(store, dataset_id)
    with versions.locked():
        head = resolve(versions)
        if base_version and base_version != head.version:
            raise FailedPrecondition(
                f"version {base_version} is no longer the latest (the latest is {head.version}): "
                "look at the latest captions and replace again"
            )
        unknown = sorted(set(stems) - set(head.captions))
        if unknown:
            raise NotFound(f"version {head.version} of dataset {dataset_id!r} has no caption(s) {_names(unknown)}")
        try:
            changed = replace_in(head.captions, pattern, replacement, regex=regex, stems=stems or None)
        except ValueError as exc:
            raise InvalidArgument(f"replace: {exc}") from exc
        if max_caption_chars:  # a short replacement applied many times can still grow a caption past it
            check_caption_lengths(changed, max_caption_chars, "captions after the replace")
        if dry_run or not changed:
            return Change(head, False, sorted(changed), _warnings(head, changed, counters))
        source = {"find": find, "replace": replacement, "regex": regex, "substring": substring,
                  "case_sensitive": case_sensitive, "stems": stems}
        version = versions.append(parent=head.version, kind="replace", trigger_word=head.trigger_word,
                                  captions={**head.captions, **changed}, author=author,
                                  comment=comment or f"replace {find!r} with {replacement!r}", source=source,
                                  expect_head=head.version)
    return Change(version, True, sorted(changed), _warnings(version, changed, counters))


def approve(store: ArtifactStore, dataset_id: str, version: int = 0, *, author: str = "", comment: str = "",
            fix_triggers: bool = False, counters: Sequence[TokenCounter] = ()) -> Change:
    """Check a version, store it as approved and publish it for training.

    Refused (FAILED_PRECONDITION, naming the stems) when a caption has no image, an image has no
    caption, or a caption holds the trigger word other than exactly once (unless fix_triggers).
    """
    versions = open_versions(store, dataset_id)
    images = image_keys(store, dataset_id)
    with versions.locked():
        chosen = resolve(versions, version)
        trigger = chosen.trigger_word
        if not trigger:
            raise FailedPrecondition(f"version {chosen.version} has no trigger word: caption the dataset again")
        no_image = sorted(set(chosen.captions) - set(images))
        no_caption = sorted(set(images) - set(chosen.captions))
        if no_image or no_caption:
            raise FailedPrecondition(
                f"version {chosen.version} of dataset {dataset_id!r} does not match its images: "
                + "; ".join(filter(None, [
                    f"captions for images that do not exist: {_names(no_image)}" if no_image else "",
                    f"images without a caption: {_names(no_caption)}" if no_caption else "",
                ]))
            )
        captions = dict(chosen.captions)
        fixed = []
        if fix_triggers:
            for stem, caption in captions.items():
                if count_trigger(caption, trigger) != 1:
                    captions[stem] = apply_trigger(caption, trigger, "keep")
                    fixed.append(stem)
        wrong = {s: count_trigger(c, trigger) for s, c in captions.items() if count_trigger(c, trigger) != 1}
        if wrong:
            listed = ", ".join(f"{s} ({n} times)" for s, n in sorted(wrong.items())[:20])
            more = f" and {len(wrong) - 20} more" if len(wrong) > 20 else ""
            raise FailedPrecondition(
                f"every approved caption must hold the trigger word {trigger!r} exactly once; version "
                f"{chosen.version} does not in: {listed}{more}. Edit them, or approve with fix_triggers"
            )
        if chosen.approved and not fixed:
            approved, created = chosen, False
        else:
            approved = versions.append(
                parent=chosen.version, kind="approve", trigger_word=trigger, captions=captions, author=author,
                comment=comment, approved=True, source={"fixed_triggers": fixed} if fixed else {},
            )
            created = True
        publish(store, dataset_id, approved)
    warnings = length_warnings(approved.captions, counters) if counters else []
    return Change(approved, created, sorted(fixed), warnings)


def publish(store: ArtifactStore, dataset_id: str, version: CaptionVersion) -> None:
    """Write a version as the <stem>.txt sidecars and captions.json (last: training's marker)."""
    prefix = keys.dataset_images(dataset_id)
    for stem, caption in version.captions.items():
        store.put_bytes(f"{prefix}{stem}.txt", (" ".join(caption.split()) + "\n").encode("utf-8"),
                        "text/plain; charset=utf-8")
    key = keys.dataset_captions(dataset_id)
    current = store.get_json(key) if store.exists(key) else {}
    store.put_json(key, {
        **current,
        "trigger_word": version.trigger_word,
        "captions": version.captions,
        "caption_version": version.version,
        "approved_version": version.version if version.approved else None,
        "sha256": version.sha256,
        "published_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    })


def export_zip(store: ArtifactStore, dataset_id: str, version: int = 0,
               repeats: int = 0) -> tuple[CaptionVersion, ObjectInfo]:
    """A kohya-style zip of a version (the approved one by default) in the store: (version, zip info).

    The zip of one version is written once and reused: versions never change, and neither do a
    dataset's images (its id is their fingerprint).
    """
    if repeats < 0:
        raise InvalidArgument(f"repeats must be 0 (files at the zip's root) or positive, got {repeats}")
    versions = open_versions(store, dataset_id)
    if version:
        chosen = versions.get(version)
    else:
        chosen = versions.latest_approved()
        if chosen is None:
            raise FailedPrecondition(
                f"dataset {dataset_id!r} has no approved captions: approve a version first, or export one by number"
            )
    images = image_keys(store, dataset_id)
    missing = sorted(set(chosen.captions) - set(images))
    if missing:
        raise FailedPrecondition(f"version {chosen.version}: captions for images that do not exist: {_names(missing)}")
    suffix = f"-r{repeats}" if repeats else ""
    key = f"{keys.dataset_prefix(dataset_id)}exports/captions-v{chosen.version:04d}{suffix}.zip"
    with tempfile.TemporaryDirectory(prefix="fluxlora-export-") as tmp:
        if store.exists(key):
            info = store.stat(key)
            if not info.sha256:  # a local store keeps no checksums
                info = ObjectInfo(key, info.size, sha256_file(store.get_file(key, Path(tmp) / "export.zip")))
            return chosen, info
        local = {
            stem: store.get_file(images[stem], Path(tmp) / "images" / images[stem].rsplit("/", 1)[-1])
            for stem in chosen.captions
        }
        folder = kohya_folder_name(repeats, chosen.trigger_word) if repeats else ""
        out = write_kohya_zip(local, chosen.captions, Path(tmp) / "export.zip", folder)
        return chosen, store.put_file(key, out, "application/zip")


def _warnings(version: CaptionVersion, changed: Mapping[str, str], counters: Sequence[TokenCounter]) -> list[str]:
    trigger = version.trigger_word
    warnings = []
    for stem in sorted(changed):
        n = count_trigger(changed[stem], trigger) if trigger else 1
        if n != 1:
            warnings.append(
                f"caption {stem!r} holds the trigger word {trigger!r} {n} times; approval needs exactly one"
            )
    if counters:
        warnings.extend(length_warnings({s: changed[s] for s in sorted(changed)}, counters))
    return warnings


def _names(stems: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(stems[:limit])
    return shown + (f" and {len(stems) - limit} more" if len(stems) > limit else "")
