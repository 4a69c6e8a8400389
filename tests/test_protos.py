"""The committed protobuf stubs are exactly what `make proto` generates from protos/."""

from pathlib import Path

from splitserve.common.protogen import REPO, generate


def test_generated_stubs_are_up_to_date(tmp_path: Path):
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    committed = REPO / "splitserve" / "v1"
    stale = [p.name for p in fresh if not (committed / p.name).exists()
             or (committed / p.name).read_bytes() != p.read_bytes()]
    extra = {p.name for p in committed.glob("*_pb2*.py*")} - {p.name for p in fresh}
    assert not stale and not extra, f"run `make proto`: stale {stale}, no longer generated {sorted(extra)}"
