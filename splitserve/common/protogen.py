"""Generate the Python protobuf and gRPC stubs from ``protos/`` (``make proto`` runs this).

The stubs land in ``splitserve/v1/`` next to the package that imports them; a test regenerates them
into a temporary folder and fails when the committed ones differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "splitserve" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto into out_dir; returns the files written."""
    from grpc_tools import protoc  # a build-time tool, not needed to run the services

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *map(str, proto_files())]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    return sorted(p for p in (out_dir / "splitserve" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    written = generate(REPO)
    print(f"generated {len(written)} files in {REPO / 'splitserve' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
