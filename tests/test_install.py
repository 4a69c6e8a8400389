"""Per-role installs: a clean virtual environment with only the gateway's extra serves the gateway's
imports and commands, and has no torch (what the gateway image relies on too)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_a_clean_venv_installs_the_gateway_extra_without_torch(tmp_path):
    source = tmp_path / "src"  # a copy: pip builds in the source tree, and the checkout stays clean
    for name in ("splitserve", "services"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling what it installs took a quarter of this test, and proves nothing here.
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", f"{source}[gateway]"],
                             capture_output=True, text=True, timeout=840)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = ("import importlib.util, sys\n"
             "import splitserve.services.gateway.server, splitserve.services.scheduler.server\n"
             "from splitserve.engine.structured import Grammar\n"
             "Grammar(json_schema='{\"type\": \"object\"}').llguidance()\n"
             "print(importlib.util.find_spec('torch') is None, importlib.util.find_spec('ucxx') is None)")
    probed = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probed.returncode == 0, probed.stderr[-3000:]
    assert probed.stdout.split() == ["True", "True"]  # neither torch nor UCX came with it
    for command in (["gateway", "--help"], ["scheduler", "--help"]):
        helped = subprocess.run([str(venv / "bin" / "splitserve"), *command], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)
        assert helped.returncode == 0 and "usage" in helped.stdout, helped.stderr[-2000:]
