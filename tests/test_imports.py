"""The gateway and the scheduler run without torch (their images carry none): nothing they import
at start may reach it."""

import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120)


def test_the_cli_gateway_and_scheduler_import_without_torch():
    out = _run("from splitserve.cli import build_parser\n"
               "build_parser().parse_args(['gateway'])\n"
               "import splitserve.services.gateway.server, splitserve.services.scheduler.main\n"
               "from splitserve.engine.model_source import resolve_model\n"
               "print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_block_really_blocks_torch():
    out = _run("import splitserve.engine.engine")
    assert out.returncode != 0 and "torch" in out.stderr


def test_the_dtype_flag_offers_exactly_the_engine_s_dtypes():
    from splitserve.common.engine_args import DTYPE_NAMES
    from splitserve.engine.config import DTYPES

    assert DTYPE_NAMES == tuple(DTYPES)
