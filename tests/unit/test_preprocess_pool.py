"""The process pool changes speed, never results: same manifest and bytes as one worker, and an
abort (a cancel) stops it and leaves no half-written outputs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fluxlora.preprocessing import pool
from fluxlora.preprocessing.job import _cgroup_cpu_quota, pool_size
from fluxlora.preprocessing.manifest import PreprocessOptions
from fluxlora.preprocessing.pipeline import preprocess_files
from fluxlora_api.shared.errors import ResourceExhausted
from photo_corpus import BAD_INPUTS, write_bad_inputs

OPTIONS = PreprocessOptions(base_size=128)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = write_bad_inputs(tmp_path_factory.mktemp("corpus"), size=(256, 192))
    return [(path.name, path) for path in sorted(folder.iterdir()) if path.suffix != ".zip"]


def test_two_workers_give_the_same_manifest_and_bytes_as_one(files, tmp_path):
    assert len(files) >= 8  # enough for the pool to start
    one = preprocess_files(files, tmp_path / "one", OPTIONS, workers=1, contact_sheet=tmp_path / "one.png")
    two = preprocess_files(files, tmp_path / "two", OPTIONS, workers=2, contact_sheet=tmp_path / "two.png")
    assert one.model_dump_json() == two.model_dump_json()
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(e.file_name for e in one.images)
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    outcomes = {key: outcome for key, (outcome, _) in BAD_INPUTS.items() if ".zip" not in key}
    assert one.image_count == sum(1 for o in outcomes.values() if o in ("kept", "near"))


def test_progress_counts_every_file_with_a_pool(files, tmp_path):
    calls = []
    preprocess_files(files, tmp_path / "out", OPTIONS, lambda *a: calls.append(a), workers=2)
    assert calls == [(done, len(files)) for done in range(1, len(files) + 1)]


def test_an_abort_stops_the_pool_and_leaves_nothing_half_done(files, tmp_path):
    class Cancelled(Exception):
        pass

    def cancel_after_two(done, total):
        if done == 2:
            raise Cancelled

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        preprocess_files(files, out, OPTIONS, cancel_after_two, workers=2)
    assert list(out.iterdir()) == []  # staging removed; no output was promoted to a final name


def test_the_pool_is_kept_between_runs(files, tmp_path):
    preprocess_files(files, tmp_path / "a", OPTIONS, workers=2)
    kept = pool._pool
    preprocess_files(files, tmp_path / "b", OPTIONS, workers=2)
    assert pool._pool is kept is not None


def test_a_worker_killed_mid_run_fails_it_clearly_and_the_next_run_gets_a_fresh_pool(files, tmp_path):
    def kill_a_worker(done, total):
        if done == 1:
            os.kill(next(iter(pool._shared_pool(2)._processes)), signal.SIGKILL)

    with pytest.raises(ResourceExhausted, match="worker process died .* Lower FLUXLORA_PREPROCESS_WORKERS"):
        preprocess_files(files, tmp_path / "a", OPTIONS, kill_a_worker, workers=2)
    again = preprocess_files(files, tmp_path / "b", OPTIONS, workers=2)
    assert again.image_count == preprocess_files(files, tmp_path / "c", OPTIONS).image_count


def test_pool_size_follows_the_setting_then_the_cgroup_quota(monkeypatch, tmp_path):
    from pydantic import ValidationError

    from fluxlora.common.config import Settings

    monkeypatch.setenv("FLUXLORA_PREPROCESS_WORKERS", "3")
    assert pool_size(Settings().preprocess_workers) == 3
    monkeypatch.setenv("FLUXLORA_PREPROCESS_WORKERS", "lots")
    with pytest.raises(ValidationError, match="preprocess_workers"):
        Settings()
    monkeypatch.delenv("FLUXLORA_PREPROCESS_WORKERS")
    assert pool_size(Settings().preprocess_workers) >= 1
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert _cgroup_cpu_quota(quota) == 2
    quota.write_text("max 100000\n")
    assert _cgroup_cpu_quota(quota) is None
    assert _cgroup_cpu_quota(Path("/nonexistent/cpu.max")) is None
