"""Flags of `splitserve bench serve` and `bench plot`, and the frozen config built from them.

Importing this module stays light (no aiohttp, grpc or matplotlib): the CLI parser imports it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from splitserve.common.auth import api_key_from_args
from splitserve.common.engine_args import positive_int
from splitserve.bench.loadgen.metrics import Slo
from splitserve.bench.loadgen.prompts import DEFAULT_TOKEN_RANGE, SharedPrefix
from splitserve.bench.loadgen.trace import MOONCAKE_BLOCK_TOKENS, TraceRequest, native_rate, read_trace
from splitserve.bench.loadgen.workloads import WORKLOAD_NAMES, Workload, get_workload, preset_slos

BACKENDS = ("openai", "openai-chat", "grpc")


@dataclass(frozen=True)
class BackendConfig:
    kind: str  # one of BACKENDS
    url: str  # http(s)://host:port for openai*, host:port (or grpc://host:port) for grpc
    model: str | None = None  # None: the first id of GET /v1/models (gRPC: the served model)
    api_key: str | None = field(default=None, repr=False)
    request_timeout_s: float = 600.0

    def to_json(self) -> dict[str, Any]:
        """Everything but the API key; `kind` is written as `backend`, the flag's name."""
        data = {k: v for k, v in asdict(self).items() if k not in ("kind", "api_key")}
        return {"backend": self.kind, **data}


@dataclass(frozen=True)
class MultiTurn:
    """Conversations: each of `turns` requests repeats the whole history (the earlier prompts and
    replies) before its new question, and is sent a think time after the previous reply ended."""

    turns: int
    think_s: float  # mean of the exponential think time; 0: the next turn at once


@dataclass(frozen=True)
class TraceReplay:
    """A Mooncake-format trace (trace.py): arrivals, lengths and shared blocks from a file."""

    path: Path
    requests: tuple[TraceRequest, ...] = field(repr=False)
    block_tokens: int = MOONCAKE_BLOCK_TOKENS  # tokens per hash id, before scaling
    length_scale: float = 1.0  # input, output and block lengths are multiplied by it

    @property
    def scaled_block_tokens(self) -> int:
        return max(1, round(self.block_tokens * self.length_scale))

    def scaled_requests(self) -> list[TraceRequest]:
        return [r.scaled(self.length_scale) for r in self.requests]

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "num_requests": len(self.requests), "block_tokens": self.block_tokens,
                "length_scale": self.length_scale, "native_rate_rps": native_rate(list(self.requests))}


@dataclass(frozen=True)
class ServeConfig:
    """One `bench serve` run: a single rate, or a sweep over several."""

    backend: BackendConfig
    workload: Workload
    rates: tuple[float, ...]
    burstiness: float = 1.0
    num_requests: int | None = 100  # exactly one of num_requests and duration_s
    duration_s: float | None = None
    seed: int = 0
    max_concurrency: int | None = None
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    fixed_prompts: bool = False
    shared_prefix: SharedPrefix | None = None  # system prompts shared by requests (a prefix cache's work)
    multi_turn: MultiTurn | None = None  # conversations; None: every request on its own
    trace: TraceReplay | None = None  # a replayed trace, which sets arrivals, lengths and prompts
    slo: Slo = field(default_factory=Slo)
    label: str | None = None
    pause_s: float = 5.0  # between sweep points, after every request of the last one finished
    output: Path | None = None
    plot: Path | None = None
    keep_records: bool = True

    def to_json(self) -> dict[str, Any]:
        local = ("backend", "output", "plot", "keep_records")
        data = {k: v for k, v in asdict(replace(self, trace=None)).items() if k not in local}
        data["rates"] = [rate_json(r) for r in self.rates]
        data["trace"] = self.trace.to_json() if self.trace else None
        return {**self.backend.to_json(), **data}


def rate_json(rate: float) -> float | str:
    """JSON has no infinity: an unlimited rate is written "inf"."""
    return rate if math.isfinite(rate) else "inf"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # inf allowed: --rate inf sends everything at once
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="server root (http://host:port; host:port for --backend grpc) (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="openai",
                   help="openai: /v1/completions with token-id prompts; openai-chat: /v1/chat/completions "
                        "with word prompts; grpc: splitserve's gateway Generate (default: %(default)s)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="model name (default: the first id of GET /v1/models)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="sent as 'Authorization: Bearer KEY' (a command line is visible to every local user: "
                        "prefer --api-key-file)")
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file")
    p.add_argument("--request-timeout", type=_positive_float, metavar="S", default=600.0,
                   help="seconds one request may take before it counts as failed (default: %(default)s)")
    load = p.add_argument_group("load")
    rate = load.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=_positive_float, metavar="R", default=1.0,
                      help="mean requests per second; 'inf' sends all at once; a --trace is replayed "
                           "with its timestamps stretched to this mean (default: %(default)s)")
    rate.add_argument("--rates", type=_positive_float, metavar="R", nargs="+", default=None,
                      help="a sweep: one point per rate, in the order given")
    load.add_argument("--burstiness", type=_positive_float, metavar="B", default=1.0,
                      help="gamma shape of the inter-arrival times: 1 is Poisson, lower is burstier "
                           "(default: %(default)s)")
    count = load.add_mutually_exclusive_group()
    count.add_argument("--num-requests", type=positive_int, metavar="N", default=None,
                       help="requests per point (default: 100 unless --duration; a --trace's first N, "
                            "default all)")
    count.add_argument("--duration", type=_positive_float, metavar="S", default=None,
                       help="send arrivals for this many seconds per point instead of a fixed count")
    load.add_argument("--max-concurrency", type=positive_int, metavar="N", default=None,
                      help="at most this many requests in flight; later arrivals wait (default: no cap)")
    load.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seed of arrivals, lengths and prompt ids (default: 0)")
    load.add_argument("--pause", type=float, metavar="S", default=5.0,
                      help="seconds to let the server drain between sweep points (default: %(default)s)")
    _add_workload_args(p)
    _add_slo_args(p)
    out = p.add_argument_group("output")
    out.add_argument("--label", default=None, metavar="NAME",
                     help="name of this run in JSON and plots (e.g. disaggregated)")
    out.add_argument("--output", type=Path, default=None, metavar="FILE.json",
                     help="write config, reports and records as JSON here")
    out.add_argument("--no-records", action="store_true",
                     help="leave the per-request records out of the JSON")
    out.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                     help="write a PNG of attainment, TTFT and TPOT vs rate")


def add_length_args(group) -> None:
    """--workload, --input-len, --output-len: the request lengths (bench serve, simulate, plan)."""
    group.add_argument("--workload", choices=WORKLOAD_NAMES, default="fixed",
                       help="request lengths: fixed, a synthetic lognormal mix, or a preset of the comparison "
                            "with vLLM, which also sets the SLOs: w1 256/64, w2 1024/16, w3 64/128 tokens in/out "
                            "(see docs/benchmarks.md) (default: %(default)s)")
    group.add_argument("--input-len", type=positive_int, metavar="N", default=None,
                       help="fixed: prompt tokens (default 128); other workloads: move the input median here")
    group.add_argument("--output-len", type=positive_int, metavar="N", default=None,
                       help="fixed: output tokens (default 32); other workloads: move the output median here")


def add_shared_prefix_args(group) -> None:
    """--system-prompts, --system-prompt-len: prompts that share prefixes (bench serve, simulate, plan)."""
    group.add_argument("--system-prompts", type=positive_int, default=None, metavar="S",
                       help="shared system prompts: each request's prompt is one of S system prompts "
                            "(drawn at random) then its own --input-len tokens; token-id backends only "
                            "(default: none)")
    group.add_argument("--system-prompt-len", type=positive_int, default=1024, metavar="L",
                       help="tokens of each system prompt (default: %(default)s)")


def shared_prefix_from_args(args: argparse.Namespace) -> SharedPrefix | None:
    return SharedPrefix(args.system_prompts, args.system_prompt_len) if args.system_prompts else None


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    add_length_args(w)
    w.add_argument("--token-range", type=int, nargs=2, metavar=("LO", "HI"),
                   default=list(DEFAULT_TOKEN_RANGE),
                   help="prompt token ids are drawn from LO <= id < HI (default: 1000 30000)")
    w.add_argument("--fixed-prompts", action="store_true",
                   help="no random per-run nonce at the start of each prompt: prompts depend on --seed only")
    add_shared_prefix_args(w)
    w.add_argument("--turns", type=positive_int, default=1, metavar="T",
                   help="multi-turn conversations of T requests: each turn's prompt is the whole history "
                        "(earlier prompts, and replies of their output length) then its own --input-len "
                        "tokens; conversations start at the rate divided by T, so requests arrive at about "
                        "the rate; token-id backends only (default: 1, no conversations)")
    w.add_argument("--think-time", type=_non_negative_float, default=1.0, metavar="S",
                   help="mean seconds (exponential) between a turn's reply and the next turn (default: "
                        "%(default)s)")
    add_trace_args(w)


def add_trace_args(group) -> None:
    """--trace and its scaling flags (bench serve, simulate)."""
    group.add_argument("--trace", type=Path, default=None, metavar="FILE.jsonl",
                       help="replay a Mooncake-format trace (one JSON line per request: timestamp in ms, "
                            "input_length, output_length, hash_ids of --trace-block-size blocks; equal ids "
                            "are equal blocks) instead of --workload; each rate stretches its timestamps to "
                            "that mean; token-id backends only")
    group.add_argument("--trace-block-size", type=positive_int, default=MOONCAKE_BLOCK_TOKENS, metavar="N",
                       help="tokens per hash id in the trace (default: %(default)s, Mooncake's)")
    group.add_argument("--trace-length-scale", type=_positive_float, default=1.0, metavar="F",
                       help="multiply the trace's input, output and block lengths by F (e.g. 0.1 for a small "
                            "machine; the sharing between requests stays) (default: %(default)s)")


def trace_from_args(args: argparse.Namespace) -> TraceReplay | None:
    """The --trace replay, its first --num-requests requests (all with --duration); None without one.
    A trace sets the lengths and shared prefixes: --workload, --input-len, --output-len and
    --system-prompts are refused beside it."""
    if args.trace is None:
        return None
    if args.system_prompts or getattr(args, "turns", 1) > 1 or args.input_len or args.output_len or (
            args.workload != "fixed"):
        raise ValueError("--trace sets the lengths and shared prefixes: it takes no --workload, "
                         "--input-len, --output-len, --system-prompts or --turns")
    if not args.trace.is_file():
        raise ValueError(f"--trace {args.trace}: no such file")
    requests = read_trace(args.trace, None if args.duration else args.num_requests)
    return TraceReplay(args.trace, tuple(requests), args.trace_block_size, args.trace_length_scale)


def _add_slo_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("SLOs (DistServe-style attainment and goodput)")
    s.add_argument("--ttft-slo", type=_positive_float, metavar="S", default=None,
                   help="time to first token target, seconds (e.g. 0.5)")
    s.add_argument("--tpot-slo", type=_positive_float, metavar="S", default=None,
                   help="time per output token target, seconds (e.g. 0.1)")
    s.add_argument("--attainment", type=_fraction, metavar="F", default=0.9,
                   help="fraction of requests that must meet both targets (default: %(default)s)")


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="JSON files written by `bench serve --output`")
    p.add_argument("--output", type=Path, required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--ttft-slo", type=float, default=None,
                   help="re-score every run's records under this TTFT target (seconds) instead of its own")
    p.add_argument("--tpot-slo", type=float, default=None, help="likewise for the TPOT target (seconds)")
    p.add_argument("--attainment", type=float, default=None, help="likewise for the attainment target")


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    for path in (args.output, args.plot):
        if path is not None and not path.resolve().parent.is_dir():
            raise ValueError(f"{path}: its folder does not exist")
    lo, hi = args.token_range
    if not 0 <= lo < hi:
        raise ValueError(f"--token-range needs 0 <= LO < HI, got {lo} {hi}")
    num_requests = args.num_requests or (None if args.duration else 100)
    for flag, given in (("--system-prompts", args.system_prompts is not None), ("--turns", args.turns > 1),
                        ("--trace", args.trace is not None)):
        if given and args.backend == "openai-chat":
            raise ValueError(f"{flag} needs a token-id backend (openai or grpc), not openai-chat")
    shared = shared_prefix_from_args(args)
    trace = trace_from_args(args)
    if trace is not None:
        num_requests = None if args.duration else len(trace.requests)
    preset_slos(args)
    return ServeConfig(
        backend=BackendConfig(args.backend, args.url, args.model, api_key_from_args(args), args.request_timeout),
        workload=get_workload(args.workload, args.input_len, args.output_len),
        rates=tuple(args.rates or [args.rate]), burstiness=args.burstiness,
        num_requests=num_requests, duration_s=args.duration, seed=args.seed,
        max_concurrency=args.max_concurrency, token_range=(lo, hi), fixed_prompts=args.fixed_prompts,
        shared_prefix=shared, multi_turn=MultiTurn(args.turns, args.think_time) if args.turns > 1 else None,
        trace=trace, slo=Slo(args.ttft_slo, args.tpot_slo, args.attainment), label=args.label,
        pause_s=args.pause,
        output=args.output, plot=args.plot, keep_records=not args.no_records)
