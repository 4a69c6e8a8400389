"""`splitserve bench engine`: the engine's prefill and decode speed against this machine's roofline
and against transformers' own generate on the same shapes."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from dataclasses import replace

import structlog
import torch

from splitserve.bench.roofline import MachineLimits, StepCost, decode_cost, prefill_cost
from splitserve.common.engine_args import apply_threads, engine_config_from_args
from splitserve.engine import LLMEngine, SamplingParams, Sequence

log = structlog.get_logger(__name__)

PREFILL_LENS = (128, 512, 2048)
TOKEN_BUDGETS = (512, 2048, 4096)
DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXTS = (256, 1024)
TARGETS = {"decode_batch1_pct": 40.0, "decode_batch32plus_pct": 55.0, "prefill_pct": 65.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeat: int, warmup: bool = True) -> float:
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


def measure_limits(dtype: torch.dtype, device: torch.device) -> MachineLimits:
    """Attainable memory read bandwidth (a large reduction) and matmul rate (a large GEMM)."""
    data = torch.ones(256 << 20, dtype=torch.float32, device=device)  # 1 GiB
    read_s = _time(lambda: data.sum(), device, 5)
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    mm_s = _time(lambda: a @ b, device, 5)
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
        seconds = _time(lambda: engine.runner.prefill(seqs, tables).argmax(-1), engine.runner.device, 3)
    finally:
        for s in seqs:
            engine.blocks.free(s.request_id)
    return seconds, [prompt_len] * len(seqs)


def bench_decode(engine: LLMEngine, batch: int, context: int, steps: int) -> float:
    """Step time at a fixed context: each step rewrites the last slot, so the shape stays put."""
    seqs = _random_seqs(engine, batch, context - 1)
    for s in seqs:
        s.output_token_ids.append(5)
        s.num_computed_tokens = context - 1
    tables = [engine.blocks.allocate(s.request_id, context) for s in seqs]
    try:
        return _time(lambda: engine.runner.decode(seqs, tables).argmax(-1).tolist(), engine.runner.device, steps)
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
        return _time(lambda: self._generate(ids, 1), self.device, 2)

    def decode_step_seconds(self, batch: int, context: int, steps: int) -> float:
        # One run each: the prefill rows already warmed the model, and a prefill of batch x context
        # tokens in transformers takes minutes at the largest shapes.
        ids = torch.randint(3, self.vocab_size, (batch, context - 1), device=self.device)
        one = _time(lambda: self._generate(ids, 1), self.device, 1, warmup=False)
        many = _time(lambda: self._generate(ids, steps + 1), self.device, 1, warmup=False)
        return max(many - one, 1e-9) / steps


def _figures(seconds: float, tokens: int, cost: StepCost, limits: MachineLimits) -> dict:
    bound = cost.bound_seconds(limits)
    return {
        "step_ms": round(seconds * 1e3, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "roofline_ms": round(bound * 1e3, 3),
        "bound_by": "memory" if cost.bytes / (limits.memory_read_gbps * 1e9) >= bound else "compute",
        "pct_of_roofline": round(100 * bound / seconds, 1),
    }


def _compare(row: dict, hf_seconds: float | None, seconds: float, tokens: int) -> dict:
    if hf_seconds is not None:
        row["transformers_tokens_per_s"] = round(tokens / hf_seconds, 1)
        row["speedup_vs_transformers"] = round(hf_seconds / seconds, 2)
    return row


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    lens, budgets, batches, contexts = (
        ((128, 512), (512,), (1, 8), (256,)) if args.quick
        else (PREFILL_LENS, TOKEN_BUDGETS, DECODE_BATCHES, DECODE_CONTEXTS)
    )
    config = engine_config_from_args(args)
    engine = LLMEngine(config)
    needed = max(max(budgets + lens), max(batches) * max(contexts)) + 64 * engine.config.block_size
    if needed * engine.layout.bytes_per_token > config.kv_cache_bytes:
        engine = LLMEngine(replace(config, kv_cache_bytes=needed * engine.layout.bytes_per_token),
                           loaded=engine.loaded)
    spec, device = engine.loaded.spec, engine.runner.device
    itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
    limits = measure_limits(config.torch_dtype, device)
    log.info("machine limits", **vars(limits))
    hf = None if args.no_transformers else TransformersBaseline(engine)

    prefill = []
    for length in lens:
        for budget in budgets:
            if budget < length and budget != min(budgets):
                continue  # one lone-prompt row per length is enough
            seconds, batch_lens = bench_prefill(engine, length, budget)
            tokens = sum(batch_lens)
            row = {"prompt_len": length, "token_budget": budget, "batch": len(batch_lens)}
            row |= _figures(seconds, tokens, prefill_cost(spec, batch_lens, itemsize), limits)
            hf_s = hf.prefill_seconds(len(batch_lens), length) if hf else None
            prefill.append(_compare(row, hf_s, seconds, tokens))
            log.info("prefill", **prefill[-1])

    decode = []
    for context in contexts:
        for batch in batches:
            seconds = bench_decode(engine, batch, context, args.steps)
            row = {"batch": batch, "context": context}
            row |= _figures(seconds, batch, decode_cost(spec, [context] * batch, itemsize), limits)
            hf_s = hf.decode_step_seconds(batch, context, args.steps) if hf else None
            decode.append(_compare(row, hf_s, seconds, batch))
            log.info("decode", **decode[-1])

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
