"""Synthetic request-length workloads: (input_len, output_len) pairs drawn from truncated lognormals.

Pure Python, no I/O, so a simulator or planner can draw the same request mix as a benchmark run:
`sample_lengths(WORKLOADS["chatbot"], 100, seed=0)` is the same list everywhere.

The three synthetic workloads follow the spirit of DistServe's applications, scaled down to a 135M
model on 2 CPU cores (prefill ~700 prompt tokens/s on one core, a decode step ~15 ms at batch 1):

| workload      | like                    | input median, sigma, range | output median, sigma, range |
|---------------|-------------------------|----------------------------|-----------------------------|
| chatbot       | ShareGPT chat           | 192, 0.8, 16..1024         | 48, 0.6, 8..192             |
| code          | HumanEval completion    | 128, 0.5, 32..512          | 24, 0.5, 8..96              |
| summarization | LongBench, prefill-heavy| 768, 0.4, 256..1536        | 32, 0.5, 8..96              |

A length is round(exp(N(ln median, sigma))), redrawn until it falls in [min, max] (truncation, not
clipping, so no mass piles up at the bounds). `fixed` has sigma 0: every request the same lengths.

The presets `w1`, `w2` and `w3` are the fixed-length workloads splitserve is compared with vLLM's
CPU backend on (docs/benchmarks.md, "Against vLLM"), each with the SLOs of that comparison: 5x
vLLM's unloaded TTFT and 3x its unloaded TPOT on this machine type. They fix their lengths; their
SLOs are the defaults of --ttft-slo and --tpot-slo.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice

MAX_REDRAWS = 10_000  # a range holding the median keeps far more than 1/10,000 of the mass


@dataclass(frozen=True)
class LengthDist:
    """A truncated lognormal over whole token counts."""

    median: int
    sigma: float
    min: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.median <= self.max:
            raise ValueError(f"need 1 <= min <= median <= max, got {self}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def sample(self, rng: random.Random) -> int:
        if self.sigma == 0 or self.min == self.max:
            return self.median
        mu = math.log(self.median)
        for _ in range(MAX_REDRAWS):
            n = round(rng.lognormvariate(mu, self.sigma))
            if self.min <= n <= self.max:
                return n
        raise ValueError(f"{self}: no draw fell in range after {MAX_REDRAWS} tries")

    def scaled_to(self, median: int) -> LengthDist:
        """The same shape with the given median; min and max scale by the same factor."""
        factor = median / self.median
        low = max(1, min(median, round(self.min * factor)))
        return LengthDist(median, self.sigma, low, max(median, round(self.max * factor)))

    @classmethod
    def fixed(cls, n: int) -> LengthDist:
        return cls(n, 0.0, n, n)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    input: LengthDist
    output: LengthDist

    def scaled(self, input_len: int | None = None, output_len: int | None = None) -> Workload:
        """This workload with its input and/or output median moved (e.g. to fit a bigger model)."""
        return replace(self, input=self.input.scaled_to(input_len) if input_len else self.input,
                       output=self.output.scaled_to(output_len) if output_len else self.output)


WORKLOADS: dict[str, Workload] = {
    "chatbot": Workload("chatbot", "ShareGPT-like chat",
                        LengthDist(192, 0.8, 16, 1024), LengthDist(48, 0.6, 8, 192)),
    "code": Workload("code", "HumanEval-like code completion",
                     LengthDist(128, 0.5, 32, 512), LengthDist(24, 0.5, 8, 96)),
    "summarization": Workload("summarization", "LongBench-like summarization (prefill-heavy)",
                              LengthDist(768, 0.4, 256, 1536), LengthDist(32, 0.5, 8, 96)),
}
FIXED_DEFAULT = (128, 32)  # fixed workload's (input_len, output_len) when not given


@dataclass(frozen=True)
class Preset:
    """A fixed-length workload with the SLOs it is measured at."""

    input_len: int
    output_len: int
    ttft_slo_s: float
    tpot_slo_s: float

    def workload(self, name: str) -> Workload:
        return Workload(name, f"every request {self.input_len} tokens in, {self.output_len} out (SLOs TTFT "
                              f"{self.ttft_slo_s:g} s, TPOT {self.tpot_slo_s:g} s)",
                        LengthDist.fixed(self.input_len), LengthDist.fixed(self.output_len))


PRESETS: dict[str, Preset] = {
    "w1": Preset(256, 64, 1.066, 0.0854),  # chat-like
    "w2": Preset(1024, 16, 4.474, 0.0919),  # prefill-heavy
    "w3": Preset(64, 128, 0.367, 0.0817),  # decode-heavy
}
WORKLOAD_NAMES = ("fixed", *WORKLOADS, *PRESETS)


def fixed_workload(input_len: int, output_len: int) -> Workload:
    return Workload("fixed", f"every request {input_len} tokens in, {output_len} out",
                    LengthDist.fixed(input_len), LengthDist.fixed(output_len))


def get_workload(name: str, input_len: int | None = None, output_len: int | None = None) -> Workload:
    """The named workload; for `fixed` the lengths themselves, otherwise the medians to scale to."""
    if name == "fixed":
        return fixed_workload(input_len or FIXED_DEFAULT[0], output_len or FIXED_DEFAULT[1])
    if name in PRESETS:
        if input_len or output_len:
            raise ValueError(f"--workload {name} fixes its lengths; give --workload fixed with --input-len and "
                             f"--output-len for others")
        return PRESETS[name].workload(name)
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    return WORKLOADS[name].scaled(input_len, output_len)


def preset_slos(args) -> None:
    """Fill in --ttft-slo and --tpot-slo from a preset --workload where they were not given."""
    preset = PRESETS.get(getattr(args, "workload", None))
    if preset is not None:
        if getattr(args, "ttft_slo", None) is None:
            args.ttft_slo = preset.ttft_slo_s
        if getattr(args, "tpot_slo", None) is None:
            args.tpot_slo = preset.tpot_slo_s


def iter_lengths(workload: Workload, seed: int) -> Iterator[tuple[int, int]]:
    """An endless reproducible stream of (input_len, output_len) for this workload and seed."""
    rng = random.Random(f"lengths:{seed}")
    while True:
        yield workload.input.sample(rng), workload.output.sample(rng)


def sample_lengths(workload: Workload, num_requests: int, seed: int) -> list[tuple[int, int]]:
    return list(islice(iter_lengths(workload, seed), num_requests))
