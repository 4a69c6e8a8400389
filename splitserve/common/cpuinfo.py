"""This machine's CPU as /proc/cpuinfo describes it (its first processor's fields): what the kernels
choose their paths by, and what a planner profile records as the machine it was measured on."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _first_processor_fields() -> dict[str, str]:
    """/proc/cpuinfo's fields, each as the first processor gives it, read once per process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpuinfo_field(name: str) -> str:
    """The first value of a /proc/cpuinfo field ("" where there is none)."""
    return _first_processor_fields().get(name, "")


def processor_name() -> str:
    """The processor as a profile records it: /proc/cpuinfo's model name, else platform's."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


# The fields that tell one generation of a processor from another where a VM's model name does not
# ("AMD EPYC" on Zen 4 and on Zen 5 alike): what a planner profile records beside the name.
GENERATION_FIELDS = {"vendor": "vendor_id", "cpu_family": "cpu family", "cpu_model": "model"}


def processor_generation() -> dict[str, str]:
    """This processor's vendor, family and model as /proc/cpuinfo gives them (those it gives)."""
    return {key: cpuinfo_field(field) for key, field in GENERATION_FIELDS.items() if cpuinfo_field(field)}
