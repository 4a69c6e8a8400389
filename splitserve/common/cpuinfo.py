"""This machine's CPU as /proc/cpuinfo describes it (its first processor's fields): what the kernels
choose their paths by, and what a planner profile records as the machine it was measured on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpuinfo_field(name: str) -> str:
    """The first value of a /proc/cpuinfo field ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return ""


def processor_name() -> str:
    """The processor as a profile records it: /proc/cpuinfo's model name, else platform's."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()
