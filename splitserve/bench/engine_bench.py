"""`splitserve bench engine`: the engine's prefill and decode speed against this machine's roofline
and against transformers' own generate on the same shapes."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from dataclasses import dataclass, replace

import structlog
import torch

from splitserve.bench.roofline import MachineLimits, StepCost, decode_cost, prefill_cost
from splitserve.common.engine_args import apply_threads, engine_config_from_args
from splitserve.engine import LLMEngine, LoadedModel, SamplingParams, Sequence
from splitserve.engine.kv_cache import KVLayout

log = structlog.get_logger(__name__)

PREFILL_LENS = (128, 512, 2048)
TOKEN_BUDGETS = (512, 2048, 4096)
DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXTS = (256, 1024)
TARGETS = {"decode_batch1_pct": 40.0, "decode_batch32plus_pct": 55.0, "prefill_pct": 65.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeat: int, warmup: bool = True) -> float:
    """Best-of-repeat wall time of fn() in seconds, after one warm-up call unless told otherwise."""
    if warmup:
        fn()
        _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def measure_limits(dtype: torch.dtype, device: torch.device, kernels=None) -> MachineLimits:
    """Attainable memory read bandwidth (a large reduction) and matmul rate (a large GEMM).

    The matmul rate is the faster of torch's GEMM and, where the engine runs them, the compiled
    kernels' (on AMX CPUs several times torch's): a roofline from the slower would let steps beat it.
    """
    data = torch.ones(256 << 20, dtype=torch.float32, device=device)  # 1 GiB
    read_s = best_time(lambda: data.sum(), device, 5)
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    mm_s = best_time(lambda: a @ b, device, 5)
    if kernels is not None and dtype == torch.bfloat16:
        packed = kernels.pack_weight(b.t().contiguous())
        mm_s = min(mm_s, best_time(lambda: kernels.gemm(a, packed, n, None), device, 5))
    return MachineLimits(memory_read_gbps=data.numel() * 4 / read_s / 1e9, matmul_gflops=2 * n**3 / mm_s / 1e9)


def _random_seqs(engine: LLMEngine, batch: int, length: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(batch * 100_003 + length)
    vocab = engine.loaded.spec.vocab_size
    seqs = []
    for i in range(batch):
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        seqs.append(Sequence(f"bench-{i}", ids, SamplingParams(temperature=0.0)))
    return seqs


def bench_prefill(engine: LLMEngine, prompt_len: int, budget: int) -> tuple[float, list[int]]:
    seqs = _random_seqs(engine, max(1, budget // prompt_len), prompt_len)
    tables = [engine.blocks.allocate(s.request_id, s.num_tokens) for s in seqs]
    try:
        runner = engine.runner
        seconds = best_time(lambda: runner.greedy(runner.prefill(seqs, tables)), runner.device, 3)
    finally:
        for s in seqs:
            engine.blocks.free(s.request_id)
    return seconds, [prompt_len] * len(seqs)


def decode_batch(engine: LLMEngine, batch: int, context: int) -> tuple[list[Sequence], list[list[int]]]:
    """batch sequences at context tokens, one to decode each, and their block tables (allocated: the
    caller frees them): each step over them rewrites the last slot, so the shape stays put."""
    seqs = _random_seqs(engine, batch, context - 1)
    for s in seqs:
        s.output_token_ids.append(5)
        s.num_computed_tokens = context - 1
    return seqs, [engine.blocks.allocate(s.request_id, context) for s in seqs]


def bench_decode(engine: LLMEngine, batch: int, context: int, steps: int) -> float:
    """Step time at a fixed context (decode_batch), the best of steps."""
    seqs, tables = decode_batch(engine, batch, context)
    try:
        runner = engine.runner
        return best_time(lambda: runner.greedy(runner.decode(seqs, tables)).tolist(), runner.device, steps)
    finally:
        for s in seqs:
            engine.blocks.free(s.request_id)


class TransformersBaseline:
    """transformers' generate() on the same weights, dtype and shapes."""

    def __init__(self, engine: LLMEngine) -> None:
        from transformers import AutoModelForCausalLM

        self.device = engine.runner.device
        self.vocab_size = engine.loaded.spec.vocab_size
        self.model = AutoModelForCausalLM.from_pretrained(
            engine.loaded.source.path, dtype=engine.config.torch_dtype).to(self.device).eval()

    def _generate(self, ids: torch.Tensor, new_tokens: int) -> None:
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    def prefill_seconds(self, batch: int, length: int) -> float:
        ids = torch.randint(3, self.vocab_size, (batch, length), device=self.device)
        return best_time(lambda: self._generate(ids, 1), self.device, 2)

    def decode_step_seconds(self, batch: int, context: int, steps: int) -> float:
        # One run each: the prefill rows already warmed the model, and a prefill of batch x context
        # tokens in transformers takes minutes at the largest shapes.
        ids = torch.randint(3, self.vocab_size, (batch, context - 1), device=self.device)
        one = best_time(lambda: self._generate(ids, 1), self.device, 1, warmup=False)
        many = best_time(lambda: self._generate(ids, steps + 1), self.device, 1, warmup=False)
        return (many - one) / steps


def _figures(seconds: float, tokens: int, cost: StepCost, limits: MachineLimits) -> dict:
    bound = cost.bound_seconds(limits)
    return {
        "step_ms": round(seconds * 1e3, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "roofline_ms": round(bound * 1e3, 3),
        "bound_by": "memory" if cost.bytes / (limits.memory_read_gbps * 1e9) >= bound else "compute",
        "pct_of_roofline": round(100 * bound / seconds, 1),
    }


def plausible_baseline(hf_seconds: float | None, bound_seconds: float) -> float | None:
    """transformers' step time, or None where it came out below the roofline, which no step can beat:
    its decode step is the difference of two generate() runs, and at large shapes the noise of the
    prefill they share can exceed that difference."""
    if hf_seconds is None or hf_seconds >= bound_seconds:
        return hf_seconds
    log.warning("transformers' step time is below the roofline; not reported",
                seconds=hf_seconds, roofline_s=bound_seconds)
    return None


def _compare(row: dict, hf_seconds: float | None, seconds: float, tokens: int) -> dict:
    if hf_seconds is not None:
        row["transformers_tokens_per_s"] = round(tokens / hf_seconds, 1)
        row["speedup_vs_transformers"] = round(hf_seconds / seconds, 2)
    return row


@dataclass(frozen=True)
class Shapes:
    prompt_lens: tuple[int, ...]
    token_budgets: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]

    @property
    def max_tokens_held(self) -> int:
        prefill = max(self.token_budgets + self.prompt_lens)
        return max(prefill, max(self.decode_batches) * max(self.decode_contexts))


FULL = Shapes(PREFILL_LENS, TOKEN_BUDGETS, DECODE_BATCHES, DECODE_CONTEXTS)
QUICK = Shapes((128, 512), (512,), (1, 8), (256,))


@dataclass
class Bench:
    """What every row needs: the engine, the machine's limits, and the transformers baseline."""

    engine: LLMEngine
    limits: MachineLimits
    hf: TransformersBaseline | None

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.engine.config.torch_dtype).element_size()


def _engine_for(args: argparse.Namespace, shapes: Shapes) -> LLMEngine:
    """One engine whose KV cache holds the largest shape (and at least what the flags ask for)."""
    config = engine_config_from_args(args)
    loaded = LoadedModel.load(config)
    spec = loaded.spec
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, config.block_size, config.torch_dtype)
    needed = (shapes.max_tokens_held + 64 * config.block_size) * layout.bytes_per_token
    return LLMEngine(replace(config, kv_cache_bytes=max(needed, config.kv_cache_bytes)), loaded=loaded)


def _prefill_rows(bench: Bench, shapes: Shapes) -> list[dict]:
    rows = []
    for length in shapes.prompt_lens:
        for budget in shapes.token_budgets:
            if budget < length and budget != min(shapes.token_budgets):
                continue  # one lone-prompt row per length is enough
            seconds, batch_lens = bench_prefill(bench.engine, length, budget)
            tokens = sum(batch_lens)
            cost = prefill_cost(bench.engine.loaded.spec, batch_lens, bench.itemsize)
            row = {"prompt_len": length, "token_budget": budget, "batch": len(batch_lens)}
            row |= _figures(seconds, tokens, cost, bench.limits)
            hf_s = bench.hf.prefill_seconds(len(batch_lens), length) if bench.hf else None
            rows.append(_compare(row, hf_s, seconds, tokens))
            log.info("prefill", **rows[-1])
    return rows


def _decode_rows(bench: Bench, shapes: Shapes, steps: int) -> list[dict]:
    rows = []
    for context in shapes.decode_contexts:
        for batch in shapes.decode_batches:
            seconds = bench_decode(bench.engine, batch, context, steps)
            cost = decode_cost(bench.engine.loaded.spec, [context] * batch, bench.itemsize)
            row = {"batch": batch, "context": context} | _figures(seconds, batch, cost, bench.limits)
            hf_s = bench.hf.decode_step_seconds(batch, context, steps) if bench.hf else None
            hf_s = plausible_baseline(hf_s, cost.bound_seconds(bench.limits))
            rows.append(_compare(row, hf_s, seconds, batch))
            log.info("decode", **rows[-1])
    return rows


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    shapes = QUICK if args.quick else FULL
    engine = _engine_for(args, shapes)
    config, device = engine.config, engine.runner.device
    limits = measure_limits(config.torch_dtype, device, getattr(engine.runner.model.ops, "k", None))
    log.info("machine limits", **vars(limits))
    bench = Bench(engine, limits, None if args.no_transformers else TransformersBaseline(engine))
    prefill, decode = _prefill_rows(bench, shapes), _decode_rows(bench, shapes, args.steps)
    report = {
        "model": engine.loaded.source.name,
        "dtype": config.dtype,
        "device": str(device),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "memory_read_gbps": round(limits.memory_read_gbps, 1),
            f"matmul_gflops_{config.dtype}": round(limits.matmul_gflops, 1),
        },
        "prefill": prefill,
        "decode": decode,
        "peak_memory_mb": _peak_memory_mb(device),
        "targets": _targets(prefill, decode),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


def _peak_memory_mb(device: torch.device) -> dict:
    peak = {"process_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def _targets(prefill: list[dict], decode: list[dict]) -> dict:
    """Each target of the engine issue next to the worst figure it covers."""
    b1 = [r["pct_of_roofline"] for r in decode if r["batch"] == 1]
    b32 = [r["pct_of_roofline"] for r in decode if r["batch"] >= 32]
    pre = [r["pct_of_roofline"] for r in prefill]
    slower = [r for r in prefill + decode if r.get("speedup_vs_transformers", 1.0) < 1.0]
    out = {}
    for name, values in (("decode_batch1_pct", b1), ("decode_batch32plus_pct", b32), ("prefill_pct", pre)):
        if values:
            worst = min(values)
            out[name] = {"target": TARGETS[name], "worst": worst, "median": statistics.median(values),
                         "met": worst >= TARGETS[name]}
    out["shapes_slower_than_transformers"] = len(slower)
    return out
