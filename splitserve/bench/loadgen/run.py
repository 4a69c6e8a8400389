"""`splitserve bench serve`: drive an OpenAI-compatible server open-loop, one point per rate.

Each point draws its arrivals (ArrivalProcess) and request lengths (workloads) from --seed, so every
rate of a sweep sees the same request mix; its prompts are fresh (the point number and a random
nonce go into them), so no point reuses another's cached prefixes. A request is sent at its arrival
time whether or not earlier ones have finished. A point ends when its last request has; the next
starts after --pause seconds.

A conversation (--turns) is closed-loop within itself: conversations arrive open-loop, and each turn
is sent a think time after the previous turn's reply ended; a turn that fails ends its conversation
(the turns left count as failed). A replayed --trace (trace.py) gives the arrivals, lengths and
shared blocks, its timestamps stretched to each rate.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import sys
import random
from dataclasses import dataclass
from typing import Any

from splitserve.bench.loadgen.arrivals import ArrivalProcess, arrival_times
from splitserve.bench.loadgen.client import Backend, Clock, RequestSpec, open_backend, send_when_due
from splitserve.bench.loadgen.config import ServeConfig, rate_json, serve_config_from_args
from splitserve.bench.loadgen.metrics import Report, format_report, summarize
from splitserve.bench.loadgen.prompts import PromptFactory, max_cached_tokens, new_nonce
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.steps import StepFigures, format_kv_pulled, format_steps, point_steps
from splitserve.bench.loadgen.sweep import sweep_goodput
from splitserve.bench.loadgen.trace import arrivals_at_rate
from splitserve.bench.loadgen.workloads import sample_lengths

FORMAT = "splitserve-bench-serve/1"
# Worker heartbeat (1 s) + the gateway's cluster poll (1 s): when the last steps of a point show on /metrics.
STEPS_LAG_S = 2.5


@dataclass(frozen=True)
class PointResult:
    rate: float
    nonce: tuple[int, ...]
    report: Report
    records: list[RequestRecord]
    steps: list[StepFigures] = ()  # the workers' engine steps over the point (splitserve servers)
    prefix_cache: str | None = None  # prefix_cache_line()
    kv_pulled: str | None = None  # format_kv_pulled()

    def to_json(self, keep_records: bool) -> dict[str, Any]:
        data = {"rate": rate_json(self.rate), "nonce": list(self.nonce), "report": self.report.to_json(),
                "engine_steps": [f.to_json() for f in self.steps], "prefix_cache": self.prefix_cache,
                "kv_pulled": self.kv_pulled}
        return {**data, "records": [r.to_json() for r in self.records]} if keep_records else data


def request_specs(config: ServeConfig, rate: float, factory: PromptFactory) -> list[RequestSpec]:
    """Every request of a point (not conversations: their later turns are made as they go)."""
    if config.trace is not None:
        return trace_specs(config, rate, factory)
    times = arrival_times(ArrivalProcess(rate, config.burstiness), config.seed,
                          num_requests=config.num_requests, duration_s=config.duration_s)
    lengths = sample_lengths(config.workload, len(times), config.seed)
    chat = config.backend.kind == "openai-chat"
    shared = config.shared_prefix.length if config.shared_prefix else 0
    return [RequestSpec(i, t, shared + n_in, n_out,
                        factory.text(i, n_in) if chat else factory.token_ids(i, n_in))
            for i, (t, (n_in, n_out)) in enumerate(zip(times, lengths))]


def trace_specs(config: ServeConfig, rate: float, factory: PromptFactory) -> list[RequestSpec]:
    requests = config.trace.scaled_requests()
    times = arrivals_at_rate(requests, rate)
    block = config.trace.scaled_block_tokens
    return [RequestSpec(i, t, r.input_len, r.output_len,
                        factory.trace_prompt(i, r.hash_ids, r.input_len, block))
            for i, (t, r) in enumerate(zip(times, requests))
            if config.duration_s is None or t < config.duration_s]


CACHE_BLOCK_SIZE = 16  # the granularity of "the workload's most": splitserve's and vLLM's default block


def prefix_cache_line(records: list[RequestRecord], prompts: dict[int, list[int]]) -> str | None:
    """How much of the prompts the server's prefix cache supplied, next to the most this workload
    allows (token-id prompts: in the order they were sent); None when the server reports no cached
    tokens."""
    reported = [r for r in records if r.ok and r.cached_tokens is not None]
    if not reported:
        return None
    prompt = sum(r.num_prompt_tokens for r in reported)
    cached = sum(r.cached_tokens for r in reported)
    line = f"prefix cache: {cached} of {prompt} prompt tokens cached ({cached / prompt:.1%})"
    sent = sorted((r for r in records if r.send_s is not None), key=lambda r: (r.send_s, r.index))
    if prompts and all(isinstance(prompts.get(r.index), list) for r in sent):
        best = max_cached_tokens([prompts[r.index] for r in sent], CACHE_BLOCK_SIZE)
        line += f"; this workload's most, {CACHE_BLOCK_SIZE}-token blocks: {best} ({best / prompt:.1%})"
    return line


def kv_pulled_line(records: list[RequestRecord], turns: int = 1) -> str | None:
    """The KV cache the decode servers pulled, per request (and per turn of a conversation), from the
    records where the backend reports it (splitserve's gRPC); None where it does not."""
    pulled = [r for r in records if r.ok and r.kv_transfer_bytes is not None]
    if not pulled:
        return None
    total = sum(r.kv_transfer_bytes for r in pulled)
    line = (f"KV pulled: {total / 1e6:.1f} MB for {len(pulled)} requests "
            f"({total / len(pulled) / 1e3:.1f} kB per request)")
    if turns > 1:
        per_turn = []
        for k in range(turns):
            sizes = [r.kv_transfer_bytes for r in pulled if r.index % turns == k]
            per_turn.append(f"{k + 1}: {sum(sizes) / len(sizes) / 1e3:.1f}" if sizes else f"{k + 1}: -")
        line += f"; kB per request by turn, {', '.join(per_turn)}"
    return line


async def run_point(config: ServeConfig, backend: Backend, rate: float, point: int) -> PointResult:
    nonce = () if config.fixed_prompts else new_nonce(config.token_range)
    factory = PromptFactory(config.seed, point, config.token_range, nonce, config.shared_prefix)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    before = await backend.engine_steps()
    clock = Clock()
    prompts: dict[int, list[int] | str] = {}
    if config.multi_turn is not None:
        records = await run_conversations(config, backend, rate, factory, clock, limit, prompts)
    else:
        specs = request_specs(config, rate, factory)
        last = specs[-1].scheduled_s if specs else 0.0
        _progress(f"rate {rate:g} req/s: {len(specs)} requests over {last:.1f} s")
        prompts.update((s.index, s.prompt) for s in specs)
        records = await asyncio.gather(*(send_when_due(backend, s, clock, limit) for s in specs))
    steps, kv_pulled = [], None
    if before is not None:
        await asyncio.sleep(STEPS_LAG_S)
        after = await backend.engine_steps() or ({}, before[1])
        steps, kv_pulled = point_steps(before[0], after[0]), format_kv_pulled(before[1], after[1])
    records = list(records)
    turns = config.multi_turn.turns if config.multi_turn else 1
    return PointResult(rate, nonce, summarize(records, config.slo), records, steps,
                       prefix_cache_line(records, prompts), kv_pulled_line(records, turns) or kv_pulled)


async def run_conversations(config: ServeConfig, backend: Backend, rate: float, factory: PromptFactory,
                            clock: Clock, limit: asyncio.Semaphore | None,
                            prompts: dict[int, list[int] | str]) -> list[RequestRecord]:
    """Conversations of config.multi_turn.turns requests, starting at rate / turns per second."""
    turns, think_s = config.multi_turn.turns, config.multi_turn.think_s
    count = None if config.num_requests is None else -(-config.num_requests // turns)
    starts = arrival_times(ArrivalProcess(rate / turns, config.burstiness), config.seed,
                           num_requests=count, duration_s=config.duration_s)
    lengths = sample_lengths(config.workload, len(starts) * turns, config.seed)
    shared = config.shared_prefix.length if config.shared_prefix else 0
    _progress(f"rate {rate:g} req/s: {len(starts)} conversations of {turns} turns, starting over "
              f"{starts[-1] if starts else 0.0:.1f} s")

    async def conversation(c: int, start_s: float) -> list[RequestRecord]:
        think = random.Random(f"think:{config.seed}:{factory.point}:{c}")
        records, history, due = [], [], start_s
        for k in range(turns):
            i = c * turns + k
            n_in, n_out = lengths[i]
            prompt = factory.token_ids(i, n_in) if k == 0 else history + factory.turn(i, n_in)
            spec = RequestSpec(i, due, (shared if k == 0 else 0) + len(history) + n_in, n_out, prompt)
            prompts[i] = prompt
            if records and not records[-1].ok:  # the conversation broke: its later turns are not sent
                record = spec.new_record()
                record.fail("an earlier turn of its conversation failed", clock.now())
            else:
                record = await send_when_due(backend, spec, clock, limit)
            records.append(record)
            reply = record.output_token_ids  # the real answer where the backend streams its ids (gRPC)
            history = prompt + (reply if reply and len(reply) == n_out else factory.reply(i, n_out))
            due = clock.now() + (think.expovariate(1 / think_s) if think_s > 0 else 0.0)
        return records

    done = await asyncio.gather(*(conversation(c, t) for c, t in enumerate(starts)))
    return sorted((r for records in done for r in records), key=lambda r: r.index)


async def run_sweep(config: ServeConfig) -> tuple[str, list[PointResult]]:
    """Every point in order; returns the model measured and the points."""
    points: list[PointResult] = []
    async with open_backend(config.backend) as backend:
        for i, rate in enumerate(config.rates):
            if i:
                await asyncio.sleep(config.pause_s)  # let the server drain queues and free KV blocks
            points.append(await run_point(config, backend, rate, i))
            print(format_report(points[-1].report, _title(config, rate)), flush=True)
            if points[-1].steps:
                print(format_steps(points[-1].steps), flush=True)
            for line in (points[-1].prefix_cache, points[-1].kv_pulled):
                if line:
                    print(line, flush=True)
        return backend.model, points


def result_json(config: ServeConfig, model: str, points: list[PointResult],
                started_at: str) -> dict[str, Any]:
    """The whole run as one JSON document (layout in docs/benchmarks.md)."""
    sweep = None
    if config.slo.given and points:
        attainments = [(p.rate, p.report.slo.attainment) for p in points if math.isfinite(p.rate)]
        sweep = sweep_goodput(attainments, config.slo.target).to_json() if attainments else None
    return {"format": FORMAT, "started_at": started_at, "config": {**config.to_json(), "model": model},
            "points": [p.to_json(config.keep_records) for p in points], "sweep": sweep}


def run(args: argparse.Namespace) -> int:
    config = serve_config_from_args(args)
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    model, points = asyncio.run(run_sweep(config))
    result = result_json(config, model, points, started_at)
    if result["sweep"] is not None and len(points) > 1:
        print(f"sweep goodput: {_goodput_text(result['sweep'])}", flush=True)
    if config.output is not None:
        config.output.write_text(json.dumps(result, indent=1) + "\n")
        _progress(f"wrote {config.output}")
    if config.plot is not None:
        from splitserve.bench.loadgen.plot import Sweep, plot_sweeps

        plot_sweeps([Sweep.from_json(result, config.label or "run")], config.plot)
        _progress(f"wrote {config.plot}")
    return 0 if all(p.report.completed for p in points) else 1


def _title(config: ServeConfig, rate: float) -> str:
    label = f"{config.label}: " if config.label else ""
    return f"{label}{config.workload.name} at {rate:g} req/s"


def _goodput_text(sweep: dict[str, Any]) -> str:
    if sweep["goodput_rps"] is None:
        return f"below the lowest rate tried ({sweep['first_failing_rate']:g} req/s fails the target)"
    bound = " (every rate passed: a lower bound)" if sweep["lower_bound_only"] else ""
    return f"{sweep['goodput_rps']:.3f} req/s at {sweep['target']:.0%} attainment{bound}"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
