"""`python -m splitserve.engine.kernels`: build the CPU kernels ahead of time (make setup does).

A failed build is logged and the engine falls back to torch ops, so setup goes on; on a CPU that
supports the kernels, tests/test_kernels.py fails instead, so CI still notices.
"""

from splitserve.common.logging import configure_logging
from splitserve.engine.kernels import load_cpu_kernels

configure_logging()
load_cpu_kernels()
