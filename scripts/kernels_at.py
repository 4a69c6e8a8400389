"""The CPU kernels as they were at a git revision, built beside this tree's, for the scripts that
time the two alternated in one process (decode-step-ab.py, gemm-rows.py, uneven-contexts-ab.py)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def load_kernels_at(revision: str, name: str):
    """Build splitserve/engine/kernels/cpu_bf16.cpp as it was at revision (git show) as module name,
    with this tree's flags and the attention's prefetch set as load_cpu_kernels sets this tree's (a
    revision from before the "l2-lines" mode gets its L1 prefetch where this CPU's mode is "l1", else
    its L2 one)."""
    from torch.utils import cpp_extension

    from splitserve.engine.kernels import CFLAGS, LDFLAGS, SOURCE, attention_prefetch

    repo = SOURCE.parents[3]
    text = subprocess.run(["git", "show", f"{revision}:{SOURCE.relative_to(repo)}"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout
    build = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    (build / "baseline.cpp").write_text(text)
    module = cpp_extension.load(name=name, sources=[str(build / "baseline.cpp")], extra_cflags=CFLAGS,
                                extra_ldflags=LDFLAGS, build_directory=str(build), verbose=False)
    if hasattr(module, "set_attention_prefetch"):
        module.set_attention_prefetch(attention_prefetch())
    elif hasattr(module, "set_attention_prefetch_l1"):  # revisions before the lines prefetch
        module.set_attention_prefetch_l1(attention_prefetch() == "l1")  # (and before the L1 one: neither)
    return module
