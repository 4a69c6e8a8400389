"""Resolving --model values and caching converted GGUF weights."""

import os
import subprocess
import sys
import time

import pytest

from splitserve.engine.loader import DEFAULT_MODEL, ModelNotFound, _default_gguf, resolve_model


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


def test_concurrent_first_starts_share_one_conversion(tmp_path):
    """Two processes starting on the same GGUF with an empty cache both succeed, with one result, and
    only one of them converts: the other waits for it (both converting took twice the CPU)."""
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
