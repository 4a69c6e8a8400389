"""The shipped placeholder profile, fitted from figures already in docs/benchmarks.md.

It stands in until `splitserve profile` is run on a quiet machine of the project's type. Every
number below is quoted from that page; what is assumed rather than measured is said so, here and in
the profile's `source`. Rebuild the file with `python -m splitserve.planner.placeholder`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from splitserve.planner.fit import FitError
from splitserve.planner.latency import (
    DecodeModel,
    DegreeProfile,
    ModelInfo,
    Overheads,
    Profile,
    StepOverheads,
    fit_decode,
    fit_kv,
    fit_prefill,
    save_profile,
)

PATH = Path(__file__).parent / "profiles" / "cpu-2core.json"
SOURCE = (
    "PLACEHOLDER, not measured by `splitserve profile`: fitted from the figures in docs/benchmarks.md "
    "(splitserve/planner/placeholder.py says which). 2 cores: `bench engine` (2 threads). 1 core: "
    "`bench latency --cpus N --threads 1` and `generate --local --threads 1` for single prompts and "
    "batch-1 decode; the 1-core decode cost per sequence and per context token is ASSUMED to be twice "
    "the 2-core fit's (compute-bound), only its fixed term is fitted to 1-core data. KV: `bench kv` "
    "UCX rows and the 3-7 ms pull of a 40-token request. Cluster step overheads: 1 core from 'Overhead "
    "at low load'; 2 cores CALIBRATED on the lowest-rate colocated sweep points (docs/figures/goodput). "
    "Replace with a measured profile."
)

# `bench engine` (2 threads): prefill (prompt_len, batch, step ms), decode (batch, context, step ms).
ENGINE_PREFILL_2 = [(128, 4, 365), (128, 16, 1384), (128, 32, 3400), (512, 1, 411), (512, 4, 1441),
                    (512, 8, 2841), (2048, 1, 1785), (2048, 1, 1805), (2048, 2, 3811)]
ENGINE_DECODE_2 = [(1, 256, 12.1), (8, 256, 17.6), (32, 256, 48.1), (64, 256, 84.4),
                   (1, 1024, 14.9), (8, 1024, 25.8), (32, 1024, 79.3), (64, 1024, 163.9)]
# One core, one prompt: the SLO table (P90 prompts), the overhead table (256), the first
# cluster-vs-engine table (40 and 576 tokens, one thread, not pinned).
PREFILL_1 = [(243, 350), (535, 776), (1282, 1949), (256, 342), (40, 58), (576, 831)]
# One core, batch 1: decode step ms at the mean context of a 64-token output after the prompt.
DECODE_1 = [(40 + 32, 15.1), (256 + 32, 16.5), (576 + 32, 19.4)]
# `bench kv` over UCX (tokens, ms), both runs, and a 40-token pull (3-7 ms).
KV_UCX = [(1024, 12.8), (4096, 60.5), (16384, 127.5), (1024, 15.0), (4096, 41.9), (40, 5.0)]
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2-135M, bfloat16
OVERHEADS = Overheads(
    gateway_s=0.0031,  # client -> gateway 1.7 ms, -> stream 0.4, -> scheduler assignment 1.0
    rpc_s=0.0015,  # assignment -> prefill start 1.5 ms
    reply_s=0.0021,  # first token published 0.2 ms, reply -> client 1.8-2.0
    notes="docs/benchmarks.md, 'Overhead at low load' (P50s of 6 sequential 256-token requests)",
)
# A 1-core worker in the disaggregated cluster: a 256-token prefill 358 ms in the server vs 342 ms
# alone; TPOT through the cluster +1.0-2.8 ms over the engine's decode step.
CLUSTER_1 = StepOverheads(round(358 / 342, 3), 0.002, "docs/benchmarks.md, 'Overhead at low load'")
# A 2-core, 2-thread colocated worker: no low-load measurement against the engine alone exists.
# CALIBRATED by hand on the lowest-rate points of the colocated sweeps (docs/figures/goodput/
# *-colocated.json: TPOT P50 27-29 ms where the engine's batch-1 step takes 12 ms; TTFT P50 1.3-1.8x
# the prefill alone), so those points are no independent check of the simulator.
CLUSTER_2 = StepOverheads(1.2, 0.015, "CALIBRATED on the colocated sweeps' lowest rates (placeholder.py)")


def _prefill_samples(rows) -> list[dict]:
    return [{"lens": [n] * batch, "s": ms / 1e3} for n, batch, ms in rows]


def _decode_samples(rows) -> list[dict]:
    return [{"contexts": [ctx] * batch, "s": ms / 1e3} for batch, ctx, ms in rows]


def one_core_decode(two_core: DecodeModel, samples: list[dict]) -> DecodeModel:
    """b and c twice the 2-core fit's (assumed); a fitted to the 1-core batch-1 samples."""
    b, c = 2 * two_core.b, 2 * two_core.c
    rest = [s["s"] - b * sum(s["contexts"]) - c * len(s["contexts"]) for s in samples]
    a = max(0.0, sum(rest) / len(rest))
    model = DecodeModel(a, b, c)
    errors = [abs(model.seconds(sum(s["contexts"]), len(s["contexts"])) - s["s"]) / s["s"] for s in samples]
    mean = sum(errors) / len(errors)
    return DecodeModel(a, b, c, FitError(len(samples), mean, max(errors), mean))


def build() -> Profile:
    prefill_2 = _prefill_samples(ENGINE_PREFILL_2)
    decode_2 = _decode_samples(ENGINE_DECODE_2)
    prefill_1 = _prefill_samples([(n, 1, ms) for n, ms in PREFILL_1])
    decode_1 = _decode_samples([(1, ctx, ms) for ctx, ms in DECODE_1])
    two = DegreeProfile(2, fit_prefill(prefill_2), fit_decode(decode_2), None, CLUSTER_2,
                        {"prefill": prefill_2, "decode": decode_2})
    one = DegreeProfile(1, fit_prefill(prefill_1), one_core_decode(two.decode, decode_1), None, CLUSTER_1,
                        {"prefill": prefill_1, "decode": decode_1})
    kv = fit_kv([{"bytes": n * KV_BYTES_PER_TOKEN, "s": ms / 1e3} for n, ms in KV_UCX], "ucx")
    machine = {"description": "the project's 2-core AVX512_BF16 x86 VM, no GPU", "num_cores": 2, "device": "cpu"}
    return Profile(SOURCE, machine, ModelInfo("SmolLM2-135M-Instruct", "bfloat16", KV_BYTES_PER_TOKEN, 8192),
                   {1: one, 2: two}, kv, OVERHEADS)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else PATH
    save_profile(build(), path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
