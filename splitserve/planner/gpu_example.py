"""An example GPU profile from published numbers: OPT-13B on NVIDIA A100-SXM4-80GB, as DistServe
(OSDI'24) profiled it for its own placement simulator.

No GPU was used to make it. The step-time coefficients are the ones DistServe publishes in
github.com/LLMServe/DistServe, simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json
(commit 7057aefe62f61c69600b1354e044e3dbc7cc1b1c), and its simdistserve/estimators/time_estimator.py
uses them in the same forms as this planner's model, in milliseconds:

    prefill = a + b * sum(len) + c * sum(len^2)
    decode  = a + b * sum(context + 1) + c * batch   ("decoding_smallbs", batches below 95)

per tensor-parallel degree (1, 2 and 4 GPUs per instance). They are the step times of DistServe's
engine, not of splitserve's, which runs one device per worker (no tensor parallelism): degrees 2
and 4 describe an engine splitserve does not have (`splitserve plan --degrees 1` leaves them out).
Everything else here is an ESTIMATE, said so in the profile's `source`. Rebuild the file with
`python -m splitserve.planner.gpu_example`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from splitserve.planner.latency import (
    DecodeModel,
    DegreeProfile,
    KvTransferModel,
    ModelInfo,
    Overheads,
    PrefillModel,
    Profile,
    StepOverheads,
    save_profile,
)

PATH = Path(__file__).parent / "profiles" / "a100-opt13b-distserve.json"
SOURCE = (
    "EXAMPLE from published numbers, not measured by `splitserve profile` and not on splitserve's engine: "
    "prefill and decode step times are DistServe's own fits for OPT-13B on A100-SXM4-80GB "
    "(github.com/LLMServe/DistServe simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json, "
    "commit 7057aefe; decode: its small-batch fit, batches < 95; degrees = tensor-parallel GPUs per instance, "
    "which splitserve's engine does not implement beyond 1). ESTIMATED: the KV transfer (1 ms + 25 GB/s, a "
    "conservative figure for NVLink within a node), no cluster step overhead, the request path's hops of the "
    "2-core CPU machine, and machine.kv_cache_gb (80 GB minus ~26 GB of fp16 weights minus working memory, "
    "used for every degree). splitserve/planner/gpu_example.py quotes every number."
)

# DistServe's coefficients (milliseconds), per tensor-parallel degree: prefill (a, b, c) and
# decoding_smallbs (a, b, c), copied from the file named above.
DISTSERVE_OPT13B_MS = {
    1: ((16.456860431694288, 0.09264750660897617, 6.474785740229194e-06),
        (19.934702624895458, 0.0006269356524350583, 0.03850697740828398)),
    2: ((13.402703359246601, 0.06234291581603636, 2.226884309113053e-06),
        (13.294796350285385, 0.00034109219700723494, 0.06296393225243659)),
    4: ((10.965724575862776, 0.034619455295915404, 4.7511361198071533e-07),
        (10.256231678259395, 0.00018786702316166354, 0.03269273629225551)),
}
OPT13B = ModelInfo("facebook/opt-13b", "float16", kv_bytes_per_token=2 * 40 * 5120 * 2,  # K+V, 40 layers, fp16
                   max_model_len=2048)
KV_TRANSFER = KvTransferModel(latency_s=0.001, bandwidth_gbps=25.0, transport="ucx (estimated)")
# num_devices: the default --resources; 4, the node of the DistServe simulator's README example.
MACHINE = {"description": "a node of 4 NVIDIA A100-SXM4-80GB (NVLink)", "device": "cuda", "num_devices": 4,
           "kv_cache_gb": 40}
HOPS = Overheads(notes="ESTIMATED: the 2-core CPU machine's hops (docs/benchmarks.md, 'Overhead at low load')")
NO_OVERHEAD = StepOverheads(notes="ESTIMATED: none; DistServe's times are its engine's steps")


def _seconds(coefficients: tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(x / 1e3 for x in coefficients)


def build() -> Profile:
    degrees = {tp: DegreeProfile(tp, PrefillModel(*_seconds(prefill)), DecodeModel(*_seconds(decode)),
                                 None, NO_OVERHEAD)
               for tp, (prefill, decode) in DISTSERVE_OPT13B_MS.items()}
    return Profile(SOURCE, MACHINE, OPT13B, degrees, KV_TRANSFER, HOPS, parallelism="devices per worker")


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else PATH
    save_profile(build(), path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
