"""Replaying a request trace in the Mooncake format (FAST'25; github.com/kvcache-ai/Mooncake traces).

One JSON object per line:

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}

`timestamp` is the arrival in milliseconds, `hash_ids` name the prompt's consecutive blocks of
`block_tokens` tokens (512 in Mooncake's traces): equal ids are equal blocks, so requests that share
leading ids share that prefix. A prompt's blocks past its hash ids are its own; ids past its length
are ignored. Lines must come in arrival order.

Scaling, so that a trace from a GPU fleet fits a small machine: `length_scale` multiplies the
input, output and block lengths (the sharing structure stays), and a replay at a given mean rate
stretches or compresses the timestamps uniformly (the burst shape stays).

Pure Python, no I/O but reading the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512
MAX_TRACE_BYTES = 1 << 30  # a trace file larger than this is refused before it is read
MAX_LINE_CHARS = 1 << 20  # one request's line
MAX_LENGTH = 1 << 24  # tokens in one request's input or output


class TraceError(ValueError):
    """A trace line that is not a request this module can replay (the message names the line)."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # since the trace's first request
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...]

    def scaled(self, factor: float) -> TraceRequest:
        """Lengths times factor (at least 1 token each); the hash ids stay."""
        return TraceRequest(self.arrival_s, max(1, round(self.input_len * factor)),
                            max(1, round(self.output_len * factor)), self.hash_ids)


def read_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """The first `limit` requests of a trace file (all without a limit), arrivals from the first's."""
    if path.stat().st_size > MAX_TRACE_BYTES:
        raise TraceError(f"{path}: larger than {MAX_TRACE_BYTES >> 20} MiB")
    requests: list[TraceRequest] = []
    first_ms = last_ms = None
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            timestamp, request = parse_line(line, where)
            if last_ms is not None and timestamp < last_ms:
                raise TraceError(f"{where}: timestamp {timestamp} is before the previous line's {last_ms}")
            first_ms = timestamp if first_ms is None else first_ms
            last_ms = timestamp
            requests.append(TraceRequest((timestamp - first_ms) / 1000.0, *request))
    if not requests:
        raise TraceError(f"{path}: no requests")
    return requests


def parse_line(line: str, where: str) -> tuple[float, tuple[int, int, tuple[int, ...]]]:
    """(timestamp in ms, (input_len, output_len, hash_ids)) of one line, checked by type and range."""
    if len(line) > MAX_LINE_CHARS:
        raise TraceError(f"{where}: longer than {MAX_LINE_CHARS} characters")
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise TraceError(f"{where}: not a JSON object")
    timestamp = data.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or not (
            math.isfinite(timestamp) and timestamp >= 0):
        raise TraceError(f"{where}: timestamp must be a number of milliseconds >= 0, got {timestamp!r}")
    lengths = []
    for name in ("input_length", "output_length"):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LENGTH:
            raise TraceError(f"{where}: {name} must be an integer in [1, {MAX_LENGTH}], got {value!r}")
        lengths.append(value)
    hash_ids = data.get("hash_ids", [])
    if not isinstance(hash_ids, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids):
        raise TraceError(f"{where}: hash_ids must be a list of integers >= 0")
    return timestamp, (lengths[0], lengths[1], tuple(hash_ids))


def arrivals_at_rate(requests: list[TraceRequest], rate: float) -> list[float]:
    """The trace's arrival times stretched or compressed uniformly to a mean of `rate` requests per
    second; all at once for an infinite rate, or when the trace has a single instant."""
    span = requests[-1].arrival_s
    if math.isinf(rate) or span == 0 or len(requests) < 2:
        return [0.0] * len(requests)
    factor = (len(requests) - 1) / span / rate
    return [r.arrival_s * factor for r in requests]


def native_rate(requests: list[TraceRequest]) -> float | None:
    """The trace's own mean arrival rate (requests per second); None for a single instant."""
    span = requests[-1].arrival_s
    return (len(requests) - 1) / span if span > 0 and len(requests) > 1 else None
