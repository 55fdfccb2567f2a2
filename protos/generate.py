"""The one command that turns protos/fluxlora_api/v1/*.proto into Python code.

    python protos/generate.py          # regenerate in place
    python protos/generate.py --check  # exit 1 when the committed code differs from the protos

Generated files (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py, *_pb2_grpc.pyi) are committed and never
edited by hand; CI runs --check.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "fluxlora_api" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    path = scripts / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            sys.exit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
        path = Path(found)
    return str(path)


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PACKAGE.glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    return sorted(
        p for p in (out_dir / "fluxlora_api" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p for p in PACKAGE.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
        stale = {p.name for p in committed} ^ {p.name for p in fresh}
        stale |= {
            p.name
            for p in fresh
            if (PACKAGE / p.name).exists() and not filecmp.cmp(p, PACKAGE / p.name, shallow=False)
        }
        if check:
            if stale:
                print("generated code is out of date: run `python protos/generate.py`:", *sorted(stale))
                return 1
            print(f"generated code matches {len(fresh) // len(GENERATED_SUFFIXES)} protos")
            return 0
        for p in committed:
            p.unlink()
        for p in fresh:
            shutil.copy2(p, PACKAGE / p.name)
        print(f"wrote {len(fresh)} files to {PACKAGE.relative_to(ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
