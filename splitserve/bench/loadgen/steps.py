"""The engine step times of a point, from splitserve's /metrics before and after it.

A splitserve gateway exports each worker's `splitserve:engine_step_seconds` (and the engine thread's
CPU time over those steps). `bench serve` reads them before and after a point and prints what the
point's steps took, per worker, kind and batch class, to read against `splitserve bench latency
--batch` (the engine alone). Workers send their histograms with heartbeats, so the figures trail by
up to two heartbeat intervals. Any other server has no such series: nothing is printed.

The same page's `splitserve:kv_transfer_bytes` histogram gives the KV cache bytes decode servers
pulled over the point, and for how many requests (a gateway observes it as each request ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

STEP_METRIC = "splitserve:engine_step_seconds"
CPU_METRIC = "splitserve:engine_step_cpu_seconds"
TOKENS_METRIC = "splitserve:engine_step_tokens"
KV_BYTES_METRIC = "splitserve:kv_transfer_bytes"
Key = tuple[str, str, str, str]  # worker, role, kind, batch


@dataclass(frozen=True)
class StepFigures:
    """A series' steps over a point."""

    worker: str
    role: str
    kind: str
    batch: str
    steps: int
    wall_s: float
    cpu_s: float
    tokens: int

    @property
    def mean_ms(self) -> float:
        return 1000 * self.wall_s / self.steps

    def to_json(self) -> dict[str, Any]:
        return {"worker": self.worker, "role": self.role, "kind": self.kind, "batch": self.batch,
                "steps": self.steps, "tokens": self.tokens, "mean_ms": round(self.mean_ms, 2),
                "cpu_share": round(self.cpu_s / self.wall_s, 3) if self.wall_s else None}


Series = dict[Key, tuple[int, float, float, int]]


def parse_steps(text: str) -> Series | None:
    """(steps, wall seconds, engine-thread CPU seconds, tokens) per series of a /metrics page; None when the
    page has no such metric (not a splitserve gateway)."""
    found = False
    counts: dict[Key, float] = {}
    walls: dict[Key, float] = {}
    cpus: dict[Key, float] = {}
    tokens: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        found = found or family.name == STEP_METRIC
        for sample in family.samples:
            labels = sample.labels
            if not {"worker", "role", "kind", "batch"} <= labels.keys():
                continue
            key = (labels["worker"], labels["role"], labels["kind"], labels["batch"])
            if sample.name == STEP_METRIC + "_count":
                counts[key] = sample.value
            elif sample.name == STEP_METRIC + "_sum":
                walls[key] = sample.value
            elif sample.name == CPU_METRIC + "_total":
                cpus[key] = sample.value
            elif sample.name == TOKENS_METRIC + "_total":
                tokens[key] = sample.value
    if not found:
        return None
    return {k: (int(n), walls.get(k, 0.0), cpus.get(k, 0.0), int(tokens.get(k, 0)))
            for k, n in counts.items()}


def parse_kv_pulled(text: str) -> tuple[int, float] | None:
    """(requests whose KV was pulled, bytes pulled in all) of a /metrics page; None without the metric."""
    count = total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == KV_BYTES_METRIC + "_count":
                count = int(sample.value)
            elif sample.name == KV_BYTES_METRIC + "_sum":
                total = sample.value
    return None if count is None or total is None else (count, total)


def format_kv_pulled(before: tuple[int, float], after: tuple[int, float]) -> str | None:
    """What the point pulled; None when it pulled nothing (colocated workers, another server)."""
    requests, pulled = after[0] - before[0], after[1] - before[1]
    if requests <= 0:
        return None
    return (f"KV pulled: {pulled / 1e6:.1f} MB for {requests} requests "
            f"({pulled / requests / 1e3:.1f} kB per request)")


def point_steps(before: Series, after: Series) -> list[StepFigures]:
    """What each series gained between two scrapes (a worker that restarted counts from zero)."""
    figures = []
    for key, now in sorted(after.items(), key=_order):
        then = before.get(key, (0, 0.0, 0.0, 0))
        if then[0] > now[0]:  # the worker started again: its counters did too
            then = (0, 0.0, 0.0, 0)
        if now[0] > then[0]:
            figures.append(StepFigures(*key, *(a - b for a, b in zip(now, then))))
    return figures


def _order(item: tuple[Key, Any]) -> tuple:
    worker, role, kind, batch = item[0]
    return worker, kind, int(batch.split("-")[0].rstrip("+"))


async def scrape_steps(session: aiohttp.ClientSession,
                       base_url: str) -> tuple[Series, tuple[int, float]] | None:
    """The step series and the KV pulled so far of base_url's /metrics; None when it has no step
    series or cannot be read."""
    try:
        async with session.get(base_url + "/metrics") as response:
            if response.status != 200:
                return None
            text = await response.text()
            steps = parse_steps(text)
            return None if steps is None else (steps, parse_kv_pulled(text) or (0, 0.0))
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def format_steps(figures: list[StepFigures]) -> str:
    lines = ["engine steps in the workers (mean wall time; engine-thread CPU share):"]
    for f in figures:
        share = f"{f.cpu_s / f.wall_s:.0%}" if f.wall_s else "-"
        lines.append(f"  {f.worker} {f.kind} batch {f.batch}: {f.steps} steps, {f.mean_ms:.1f} ms, "
                     f"CPU {share}")
    return "\n".join(lines)
