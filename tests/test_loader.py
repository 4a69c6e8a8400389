"""Resolving --model values and caching converted GGUF weights."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitserve.engine import model_source
from splitserve.engine.loader import DEFAULT_MODEL, ModelNotFound, _default_gguf, resolve_model
from splitserve.engine.model_source import SOURCE_RECORD, cached_conversion


def test_default_model_is_cached_as_safetensors():
    source = resolve_model(None)
    assert source.name == DEFAULT_MODEL
    assert (source.path / "model.safetensors").stat().st_size > 400e6  # float32 weights
    assert (source.path / "config.json").exists()
    assert resolve_model(DEFAULT_MODEL).path == source.path


def test_gguf_path_resolves_to_the_same_cache():
    assert resolve_model(str(_default_gguf())).path == resolve_model(None).path


def test_second_start_loads_from_cache_in_seconds(tmp_path):
    # A fresh process; the cache was filled by the session fixtures or an earlier run.
    code = ("import time; t=time.monotonic(); from splitserve.engine import EngineConfig, LoadedModel; "
            "LoadedModel.load(EngineConfig()); print(time.monotonic()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ}, check=True)
    seconds = float(out.stdout.strip().splitlines()[-1])
    print(f"cached load took {seconds:.1f}s")
    assert seconds < 15  # converting the GGUF again takes ~20 s on top of the imports


def test_unknown_model_gets_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Read once at import, which earlier tests did: without this the hub is tried (20 s of retries here).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFound, match="no-such-org/no-such-model"):
        resolve_model("no-such-org/no-such-model")
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="not a folder or a .gguf file"):
        resolve_model(str(bad))


def test_concurrent_first_starts_share_one_conversion(tmp_path, monkeypatch):
    """Two processes starting on the same GGUF with an empty cache both succeed, with one result, and
    only one of them converts: the other waits for it (both converting took twice the CPU). The
    conversion clears what a killed one left and the conversions of GGUF files since gone."""
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    folder, _ = cached_conversion(_default_gguf())
    killed = folder.with_name(folder.name + ".tmp99999")  # a conversion killed before its rename
    replaced = folder.with_name(folder.name[:-12] + "0" * 12)  # the wheel's earlier install's
    for made in (killed, replaced):
        made.mkdir(parents=True)
        (made / "model.safetensors").write_bytes(b"\0" * 1024)
    (replaced / SOURCE_RECORD).write_text(json.dumps({"gguf": str(tmp_path / "gone.gguf"), "size": 1,
                                                      "mtime_ns": 1, "host": model_source._host()}))
    code = "from splitserve.engine.loader import resolve_model; print(resolve_model(None).path)"
    env = {**os.environ, "SPLITSERVE_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1
    models = list((tmp_path / "models").iterdir())
    assert [m.name for m in models] == [os.path.basename(paths.pop())]  # no leftover temp folders
    logs = [out + err for out, err in results]
    assert sum("converting gguf" in log for log in logs) == 1, [log[-500:] for log in logs]
    assert json.loads((folder / SOURCE_RECORD).read_text())["gguf"] == str(_default_gguf().resolve())


def test_conversions_of_gguf_files_gone_or_changed_are_removed_and_nothing_else(tmp_path):
    """Every reinstall of the default model's wheel (and every venv deleted) left a ~0.5 GB conversion
    in the cache for good; the next conversion now removes those whose GGUF is gone or changed on this
    machine, and what a removal cut short left, and nothing else: the current ones, folders without a
    well-formed record (older versions', or not ours), another machine's (a shared cache), and
    conversions under way."""
    models = tmp_path / "models"
    live = tmp_path / "live.gguf"
    live.write_bytes(b"gguf")
    stat, here = live.stat(), model_source._host()
    gone = {"gguf": str(tmp_path / "deleted.gguf"), "size": 4, "mtime_ns": 1, "host": here}

    def conversion(name: str, record=None) -> Path:
        folder = models / name
        folder.mkdir(parents=True)
        if record is not None:
            (folder / SOURCE_RECORD).write_text(record if isinstance(record, str) else json.dumps(record))
        return folder

    kept = conversion("kept")
    removed = [conversion("gone", gone),
               conversion("changed", {**gone, "gguf": str(live), "size": stat.st_size}),
               conversion("cut-short.trash4242")]
    current = {**gone, "gguf": str(live), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    left = [conversion("current", current), conversion("legacy"), conversion("list", "[1, 2]"),
            conversion("no-path", {**gone, "gguf": 7}),
            conversion("relative", {**gone, "gguf": "deleted.gguf"}),
            conversion("bool-size", {**gone, "size": True}),
            conversion("nested", "[" * 100_000 + "]" * 100_000),
            conversion("huge", {**gone, "pad": "x" * 8192}),
            conversion("elsewhere", {**gone, "host": here + "-x"}),
            conversion("current.tmp4242")]
    model_source._forget_replaced(kept)
    assert sorted(p.name for p in models.iterdir()) == sorted(p.name for p in [kept, *left])
    assert not any(p.exists() for p in removed)
