"""The chaos run's S3 proxy (bench/chaoslib/system.py) fakes faults as S3 has them, and no longer: a
lost bucket ends for every connection when the fault ends, as a bucket restored on S3 does."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from fluxlora.common.s3_retry import RetryPolicy
from fluxlora.common.storage import S3Store
from fluxlora_api.shared.errors import Unavailable

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from chaoslib.system import S3_KEY, S3_SECRET, S3Proxy  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def test_a_lost_bucket_ends_for_connections_opened_during_it():
    proxy = S3Proxy()
    try:
        store = S3Store.connect(proxy.address, f"chaos-{uuid.uuid4().hex[:8]}", S3_KEY, S3_SECRET, secure=False,
                                retry=RetryPolicy(retries=2, base_s=0.05, max_s=0.1))
        store.put_bytes("jobs/preprocessing/pre-1.json", b"{}")
        proxy.set("lost_bucket")
        for _ in range(2):  # (UNAVAILABLE, not NOT_FOUND: every key of a lost bucket reads as missing)
            with pytest.raises(Unavailable):
                store.get_bytes("jobs/preprocessing/pre-1.json")
        proxy.set("normal")
        # the client's pool reuses the connection the fault answered: it must answer normally now
        for _ in range(3):
            assert store.get_bytes("jobs/preprocessing/pre-1.json") == b"{}"
        store.put_bytes("jobs/preprocessing/pre-2.json", b"{}")
    finally:
        proxy.close()
