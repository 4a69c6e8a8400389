"""How fast the decode step's two big reads stream from memory, next to a plain sequential read:
the compiled decode attention over 30 layers' K/V caches (so that they do not fit the L3 cache), and
the model's GEMM shapes over two models' worth of packed weights (60 layers and 2 LM heads) at a few row
counts. On two threads:

    .venv/bin/python scripts/memory-streams.py --threads 2 --batch 32 --context 1024 --rows 8 32 64

What docs/benchmarks.md's "Greedy rows below min_tokens", "bench engine after the argmax kernel" and
"On AMD's Zen 5" figures for the decode attention and the GEMMs were measured with (SmolLM2-135M's
shapes: 9 query heads over 3 KV heads of 64 dimensions, 16-token blocks; the best of --repeat passes).
The sequential read is `bench engine`'s memory bandwidth, measured the same way (`measure_limits`).
The caches are on 2 MiB pages as the engine's are since 2026-12-06; the figures measured before with
4 KiB pages are `--pages small`.
"""

from __future__ import annotations

import argparse
import json

import torch

from splitserve.bench.engine_bench import best_time, measure_limits
from splitserve.engine.kernels import load_cpu_kernels
from splitserve.engine.kv_cache import zeros_on_huge_pages

LAYERS = 30
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
GEMM_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (K, N): qkv, o, gate_up, down
LM_HEAD = (576, 49152)  # once per 30 layers, as in the model


CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--batch", type=int, default=32, help="decode sequences (default: 32)")
    parser.add_argument("--context", type=int, default=1024, help="tokens of context each (default: 1024)")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64],
                        help="GEMM rows (default: 8 32 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes, the best kept (default: 3)")
    parser.add_argument("--pages", choices=["huge", "small"], default="huge",
                        help="the K/V caches on 2 MiB pages, as the engine allocates them, or on 4 KiB "
                             "pages (default: huge)")
    parser.add_argument("--prefetch", choices=["default", "l1", "l2", "l2-lines"], default="default",
                        help="how the decode attention prefetches K and V (default: this CPU's, as "
                             "the engine sets it)")
    args = parser.parse_args()
    kernels = load_cpu_kernels()
    if kernels is None:
        raise SystemExit("the CPU kernels do not run here (no AVX512_BF16)")
    torch.set_num_threads(args.threads)
    if args.prefetch != "default":
        kernels.set_attention_prefetch(args.prefetch)
    result = {"threads": args.threads, "amx": kernels.amx_enabled(), "pages": args.pages,
              "prefetch": kernels.attention_prefetch()}

    limits = measure_limits(torch.bfloat16, CPU, kernels)  # bench engine's roofline: a 1 GiB sum, a GEMM
    result["sequential_read_gbps"] = round(limits.memory_read_gbps, 1)
    result["matmul_gflops"] = round(limits.matmul_gflops)

    width = -(-args.context // BLOCK)
    num_blocks = args.batch * width

    def cache() -> torch.Tensor:
        values = torch.randn(num_blocks, KV_HEADS, BLOCK, HEAD_DIM).bfloat16()
        if args.pages == "small":
            return values
        return zeros_on_huge_pages(tuple(values.shape), values.dtype).copy_(values)

    caches = [(cache(), cache()) for _ in range(LAYERS)]
    tables = torch.randperm(num_blocks).view(args.batch, width).contiguous()
    lens = torch.full((args.batch,), args.context, dtype=torch.long)
    q = torch.randn(args.batch, HEADS, HEAD_DIM).bfloat16()

    def attend_all() -> None:
        for k, v in caches:
            kernels.decode_attention(q, k, v, tables, lens, HEAD_DIM**-0.5)

    seconds = best_time(attend_all, CPU, args.repeat)
    kv_bytes = sum(k.numel() + v.numel() for k, v in caches) * 2
    result["decode_attention"] = {"batch": args.batch, "context": args.context, "layers": LAYERS,
                                  "ms": round(seconds * 1e3, 2), "gbps": round(kv_bytes / seconds / 1e9, 1)}
    caches.clear()  # 755 MB at the defaults

    shapes = (GEMM_SHAPES * LAYERS + [LM_HEAD]) * 2  # the model's weights twice over: not all in L3
    weights = [(kernels.pack_weight((torch.randn(n, k) / 24).bfloat16()), n, k) for k, n in shapes]
    weight_bytes = sum(n * k * 2 for k, n in shapes)
    result["gemm"] = []
    for rows in args.rows:
        xs = {k: torch.randn(rows, k).bfloat16() for k, _ in shapes}

        def multiply_all() -> None:
            for packed, n, k in weights:
                kernels.gemm(xs[k], packed, n, None)

        seconds = best_time(multiply_all, CPU, args.repeat)
        result["gemm"].append({"rows": rows, "weight_mb": round(weight_bytes / 1e6),
                               "ms": round(seconds * 1e3, 2),
                               "weights_gbps": round(weight_bytes / seconds / 1e9, 1),
                               "gflops": round(rows * weight_bytes / seconds / 1e9)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
