"""`python -m splitserve.engine.kernels`: build the CPU kernels ahead of time (make setup does)."""

import sys

from splitserve.common.logging import configure_logging
from splitserve.engine.kernels import kernels_enabled, load_cpu_kernels

configure_logging()
sys.exit(0 if load_cpu_kernels() is not None or not kernels_enabled() else 1)
