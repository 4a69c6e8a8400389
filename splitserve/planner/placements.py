"""The placements the planner may choose from, and a throughput ceiling for each.

A placement is what `splitserve up` starts: disaggregated, `p` prefill workers of `dp` cores (or
devices) each and `d` decode workers of `dd`; or colocated (or chunked), `c` workers of `dc`. Only
degrees the profile has a latency model for are used, and on a CPU only placements `splitserve up`
can start: it splits `--cpus` evenly among the workers, prefill first, earlier ones taking any
remainder, so 1 prefill x 2 cores + 1 decode x 1 core is possible (3 cores) and the reverse is not.

The ceiling is the request rate the workers could not exceed even with perfect batching: each role's
work per request at the lowest cost the latency model allows (a prefill batch's fixed cost shared by
nothing, a decode step's fixed cost shared by a full batch). The planner searches below it and skips
placements whose ceiling cannot beat what it has already found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.commands.up import split_cpus
from splitserve.planner.latency import DegreeProfile, Profile
from splitserve.planner.sim_engine import EngineSettings
from splitserve.planner.simulator import ClusterSpec, Mode, SimRequest


@dataclass(frozen=True)
class Placement:
    mode: Mode
    num_prefill: int  # prefill servers (disaggregated) or colocated workers (the other modes)
    prefill_degree: int
    num_decode: int = 0  # decode servers, disaggregated only
    decode_degree: int = 0

    @property
    def resources(self) -> int:
        """Cores (or devices) the placement uses."""
        return self.num_prefill * self.prefill_degree + self.num_decode * self.decode_degree

    @property
    def degrees(self) -> set[int]:
        return {self.prefill_degree, self.decode_degree} - {0}

    def cluster(self, engine: EngineSettings) -> ClusterSpec:
        return ClusterSpec(self.mode, self.num_prefill, self.num_decode, self.prefill_degree,
                           self.decode_degree or self.prefill_degree, engine)

    def describe(self) -> str:
        if self.mode is Mode.DISAGGREGATED:
            return f"{self.num_prefill}P x{self.prefill_degree} + {self.num_decode}D x{self.decode_degree}"
        return f"{self.num_prefill} {self.mode.value} x{self.prefill_degree}"


def is_cpu(profile: Profile) -> bool:
    return profile.parallelism.startswith("cores")


def default_resources(profile: Profile) -> int | None:
    """The profiled machine's cores (CPU) or devices (GPU), when its profile says."""
    value = profile.machine.get("num_cores" if is_cpu(profile) else "num_devices")
    return int(value) if value else None


def startable(placement: Placement) -> bool:
    """Whether `splitserve up --cpus <that many cores>` gives each worker its planned share."""
    p = placement
    shares = [len(s) for s in split_cpus(list(range(p.resources)), p.num_prefill + p.num_decode)]
    return shares == [p.prefill_degree] * p.num_prefill + [p.decode_degree] * p.num_decode


def enumerate_placements(profile: Profile, resources: int, modes: Sequence[Mode],
                         degrees: Sequence[int] | None = None) -> list[Placement]:
    """Every placement within `resources` of the given modes and the profile's degrees."""
    usable = sorted(set(profile.degrees) & set(degrees or profile.degrees))
    found: list[Placement] = []
    for mode in modes:
        if mode is Mode.DISAGGREGATED:
            found += [Placement(mode, p, dp, d, dd) for dp in usable for dd in usable
                      for p in range(1, resources // dp + 1) for d in range(1, (resources - p * dp) // dd + 1)]
        else:
            found += [Placement(mode, c, dc) for dc in usable for c in range(1, resources // dc + 1)]
    return [p for p in found if not is_cpu(profile) or startable(p)]


# -- the ceiling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadShape:
    """Means over the requests the planner simulates."""

    mean_input: float
    mean_input_squared: float
    mean_decode_tokens: float  # output tokens after the first (the first comes from the prefill)

    @classmethod
    def of(cls, requests: Sequence[SimRequest]) -> WorkloadShape:
        n = len(requests)
        return cls(sum(r.input_len for r in requests) / n, sum(r.input_len ** 2 for r in requests) / n,
                   sum(r.output_len - 1 for r in requests) / n)


def _prefill_s(degree: DegreeProfile, shape: WorkloadShape) -> float:
    """Least prefill seconds per request: no fixed cost (shared by a batch), per token and per pair."""
    model = degree.prefill
    seconds = model.b * shape.mean_input + model.c * shape.mean_input_squared
    if degree.mixed is not None:  # chunks may be cheaper in a mixed step
        seconds = min(seconds, degree.mixed.b * shape.mean_input + degree.mixed.c * shape.mean_input_squared)
    return seconds * degree.cluster.prefill_factor


def _decode_token_s(degree: DegreeProfile, max_num_seqs: int) -> float:
    """Least seconds per decode token: a full batch shares the step's fixed costs."""
    seconds = (degree.decode.a + degree.cluster.decode_s) / max_num_seqs + degree.decode.c
    return min(seconds, degree.mixed.b) if degree.mixed is not None else seconds


def ceiling(placement: Placement, profile: Profile, shape: WorkloadShape, max_num_seqs: int) -> float:
    """Requests per second the placement cannot exceed, whatever the SLOs."""
    p = placement
    prefill = profile.degree(p.prefill_degree)
    if p.mode is not Mode.DISAGGREGATED:
        work = _prefill_s(prefill, shape) + shape.mean_decode_tokens * _decode_token_s(prefill, max_num_seqs)
        return p.num_prefill / work if work > 0 else float("inf")
    decode_work = shape.mean_decode_tokens * _decode_token_s(profile.degree(p.decode_degree), max_num_seqs)
    prefill_work = _prefill_s(prefill, shape)
    return min(p.num_prefill / prefill_work if prefill_work > 0 else float("inf"),
               p.num_decode / decode_work if decode_work > 0 else float("inf"))
