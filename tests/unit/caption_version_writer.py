"""A second captioning replica for the version race tests: appends caption versions to one dataset
from its own process (its own store client, its own in-process lock), starting when the go file
appears so that the writers really run at the same time.

    python caption_version_writer.py STORE DATASET WRITER COUNT GO_FILE
STORE: a directory, or s3://bucket@host:port (moto). Prints the version numbers it got, one a line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fluxlora.common.storage import LocalStore, S3Store
from fluxlora.domain.caption_versions import CaptionVersions


def open_store(uri: str):
    if uri.startswith("s3://"):
        bucket, endpoint = uri[len("s3://"):].split("@", 1)
        return S3Store.connect(endpoint, bucket, "test", "test", secure=False)
    return LocalStore(Path(uri))


def main(uri: str, dataset_id: str, writer: str, count: int, go_file: str) -> None:
    versions = CaptionVersions(open_store(uri), dataset_id)
    deadline = time.monotonic() + 60
    while not Path(go_file).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    for i in range(count):
        version = versions.append(parent=0, kind="approve", trigger_word="ohwx", approved=True, author=writer,
                                  captions={"img-1": f"ohwx, {writer} {i}"})
        print(version.version, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
