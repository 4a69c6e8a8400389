"""`splitserve plan`: the placement with the best goodput per core (or device), by simulation.

For every placement within the resources (placements.py), the planner finds the highest Poisson rate
at which the simulated cluster still meets the SLO attainment (rate_search.py), with the arrivals and
lengths `bench serve` would send at that rate and seed: the same requests for every placement, so the
comparison is paired. Goodput per core is that rate divided by the cores the placement uses.

The search runs in two stages. First every placement at the engine's default token budget and batch
limit, in order of its ceiling per core, skipping a placement whose ceiling (times PRUNE_SLACK, for
the short overloads a finite run survives) is below the best goodput per core found so far. Then,
for the placements within REFINE_WITHIN of the best, one knob at a time: each token budget at the
default batch limit, then each batch limit at the best budget. A knob's search starts from the
neighbour's answer, which costs two simulations when the knob changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from splitserve.bench.loadgen.config import ServeConfig
from splitserve.bench.loadgen.metrics import Report, summarize
from splitserve.planner.cli_config import default_degrees
from splitserve.planner.latency import Profile
from splitserve.planner.placements import Placement, WorkloadShape, ceiling, enumerate_placements, is_cpu
from splitserve.planner.rate_search import RateSearch, max_rate
from splitserve.planner.sim_engine import EngineSettings
from splitserve.planner.simulator import ClusterSpec, Mode, workload_requests
from splitserve.planner.sweep import SimulatedRun, simulate_point

DEFAULT_TOKEN_BUDGETS = (256, 512, 1024, 2048, 4096)
DEFAULT_MAX_NUM_SEQS = (16, 32, 64, 128)
DEFAULT_NUM_REQUESTS = 400  # per simulation; see docs/planner.md "Plan" for the stability check
PRUNE_SLACK = 1.5
REFINE_WITHIN = 0.8
DEFAULT_MODES = (Mode.DISAGGREGATED, Mode.COLOCATED)
DEFAULTS = EngineSettings()  # the engine's token budget and batch limit


@dataclass(frozen=True)
class PlanSpec:
    """What to plan for: a profile, the `bench serve` run to pass (workload, count, seed, SLOs) and
    the resources; what to search: modes, degrees and the knobs' values."""

    profile: Profile
    serve: ServeConfig
    resources: int
    modes: tuple[Mode, ...] = DEFAULT_MODES
    degrees: tuple[int, ...] | None = None  # None: every degree in the profile
    token_budgets: tuple[int, ...] = DEFAULT_TOKEN_BUDGETS
    max_num_seqs: tuple[int, ...] = DEFAULT_MAX_NUM_SEQS
    engine: EngineSettings = field(default_factory=EngineSettings)  # the defaults and the KV cache
    num_seeds: int = 1  # > 1: each rate's attainment over this many runs, seeds serve.seed, +1, ...
    rel_tol: float = 0.02
    prune: bool = True

    def __post_init__(self) -> None:
        if not self.serve.slo.given:
            raise ValueError("give a TTFT or a TPOT SLO (or both): without one every rate meets it")
        if self.serve.num_requests is None:
            raise ValueError("the planner simulates a number of requests per rate, not a duration")


@dataclass(frozen=True)
class Candidate:
    placement: Placement
    token_budget: int
    max_num_seqs: int

    def engine(self, base: EngineSettings) -> EngineSettings:
        return replace(base, token_budget=self.token_budget, max_num_seqs=self.max_num_seqs)


@dataclass(frozen=True)
class Evaluation:
    candidate: Candidate
    search: RateSearch
    report: Report | None  # the simulated run at max_rate

    @property
    def max_rate(self) -> float:
        return self.search.max_rate or 0.0

    @property
    def goodput_per_unit(self) -> float:
        """Requests per second meeting the SLOs, per core (or device) used."""
        return self.max_rate / self.candidate.placement.resources


@dataclass(frozen=True)
class Pruned:
    placement: Placement
    ceiling_rps: float


@dataclass
class Plan:
    spec: PlanSpec
    evaluations: list[Evaluation]  # best first
    pruned: list[Pruned]
    baseline: Evaluation | None  # `splitserve up`'s defaults: 1 prefill + 1 decode
    num_simulations: int
    seconds: float

    @property
    def best(self) -> Evaluation | None:
        return self.evaluations[0] if self.evaluations and self.evaluations[0].max_rate > 0 else None

    @property
    def most_goodput(self) -> Evaluation | None:
        """The configuration with the most goodput (fewer cores on a tie), where `best` ranks by
        goodput per core: the choice when the cores are there already (the launcher's, a running
        cluster's). None when none met the SLOs."""
        return max((e for e in self.evaluations if e.max_rate > 0), default=None,
                   key=lambda e: (e.max_rate, -e.candidate.placement.resources))


class Planner:
    """One plan's searches: every evaluation kept, so a configuration is never searched twice."""

    def __init__(self, spec: PlanSpec) -> None:
        self.spec = spec
        serve = spec.serve
        self.shape = WorkloadShape.of(workload_requests(serve.workload, 1.0, serve.seed,
                                                        burstiness=serve.burstiness,
                                                        num_requests=serve.num_requests))
        self.done: dict[Candidate, Evaluation] = {}
        self.pruned: list[Pruned] = []

    def evaluate(self, candidate: Candidate, bracket: tuple[float, float] | None = None) -> Evaluation:
        if candidate in self.done:
            return self.done[candidate]
        cluster = candidate.placement.cluster(candidate.engine(self.spec.engine))
        reports: dict[float, Report] = {}

        def attainment(rate: float) -> float:
            reports[rate] = self.simulate(cluster, rate)
            return reports[rate].slo.attainment

        guess = self.ceiling(candidate) / 2
        search = max_rate(attainment, self.spec.serve.slo.target, guess if guess < float("inf") else 1.0,
                          bracket, self.spec.rel_tol)
        self.done[candidate] = Evaluation(candidate, search, reports.get(search.max_rate))
        return self.done[candidate]

    def simulate(self, cluster: ClusterSpec, rate: float) -> Report:
        """`bench serve`'s report of the cluster at this rate (over every seed's requests at once)."""
        spec = self.spec
        if spec.num_seeds == 1:
            return simulate_point(SimulatedRun(spec.profile, cluster, spec.serve), rate).report
        records = [record for i in range(spec.num_seeds) for record in simulate_point(
            SimulatedRun(spec.profile, cluster, replace(spec.serve, seed=spec.serve.seed + i)), rate).records]
        return summarize(records, spec.serve.slo)

    def ceiling(self, candidate: Candidate) -> float:
        return ceiling(candidate.placement, self.spec.profile, self.shape, candidate.max_num_seqs)

    def default_candidate(self, placement: Placement) -> Candidate:
        """The placement at the engine's default knobs (the nearest values of the grid)."""
        spec = self.spec
        return Candidate(placement, _nearest(spec.token_budgets, spec.engine.token_budget),
                         _nearest(spec.max_num_seqs, spec.engine.max_num_seqs))

    def first_pass(self, placements: list[Placement]) -> list[Evaluation]:
        """Every placement at the default knobs, best ceiling first, skipping what cannot win."""
        candidates = sorted(map(self.default_candidate, placements),
                            key=lambda c: -self.ceiling(c) / c.placement.resources)
        best = 0.0
        for candidate in candidates:
            # The ceiling at the largest batch limit: refining could reach it.
            ceiling_rps = self.ceiling(replace(candidate, max_num_seqs=max(self.spec.max_num_seqs)))
            if self.spec.prune and ceiling_rps * PRUNE_SLACK / candidate.placement.resources < best:
                self.pruned.append(Pruned(candidate.placement, ceiling_rps))
                continue
            best = max(best, self.evaluate(candidate).goodput_per_unit)
        return [self.done[c] for c in candidates if c in self.done]

    def refine(self, start: Evaluation) -> None:
        """One knob at a time around start: the token budget, then the batch limit. Values are tried
        outwards from the current one, each search starting from its neighbour's answer; a side
        stops at the first value that does worse than its neighbour."""
        best = start
        for axis, values in (("token_budget", self.spec.token_budgets), ("max_num_seqs", self.spec.max_num_seqs)):
            origin, current = best, getattr(best.candidate, axis)
            for side in (sorted(v for v in values if v < current)[::-1], sorted(v for v in values if v > current)):
                neighbour = origin
                for value in side:
                    result = self.evaluate(replace(best.candidate, **{axis: value}), neighbour.search.bracket)
                    if result.max_rate < neighbour.max_rate:
                        break
                    best = max(best, result, key=lambda e: e.max_rate)  # the first of equals stays
                    neighbour = result

    def baseline(self) -> Evaluation | None:
        """`splitserve up`'s default cluster: 1 prefill + 1 decode, the cores split between them
        (on GPUs, one device each); None where the profile has no such degrees."""
        spec = self.spec
        if spec.resources < 2:
            return None
        prefill, decode = default_degrees(spec.resources, 1, 1)[:2] if is_cpu(spec.profile) else (1, 1)
        if not {prefill, decode} <= set(spec.profile.degrees):
            return None
        engine = spec.engine
        return self.evaluate(Candidate(Placement(Mode.DISAGGREGATED, 1, prefill, 1, decode), engine.token_budget,
                                       engine.max_num_seqs))


def plan(spec: PlanSpec) -> Plan:
    """Search, refine, rank; see the module docstring."""
    started = time.perf_counter()
    planner = Planner(spec)
    placements = enumerate_placements(spec.profile, spec.resources, spec.modes, spec.degrees)
    if not placements:
        raise ValueError(f"no placement of {'/'.join(m.value for m in spec.modes)} fits in {spec.resources} "
                         f"{spec.profile.parallelism.split()[0]} with the profile's degrees")
    first = planner.first_pass(placements)
    top = max(e.goodput_per_unit for e in first)
    for evaluation in first:
        if top > 0 and evaluation.goodput_per_unit >= REFINE_WITHIN * top:
            planner.refine(evaluation)
    baseline = planner.baseline()
    ranked = sorted((e for e in planner.done.values() if e.candidate.placement.mode in spec.modes), key=_rank)
    return Plan(spec, ranked, planner.pruned, baseline,
                sum(e.search.num_simulations for e in planner.done.values()), time.perf_counter() - started)


def _nearest(values: tuple[int, ...], default: int) -> int:
    return min(values, key=lambda v: (abs(v - default), v))


def _rank(e: Evaluation) -> tuple:
    """Goodput per unit; then the higher rate (a bigger pool); then the engine's defaults."""
    c = e.candidate
    return (-e.goodput_per_unit, -e.max_rate, c.placement.resources,
            abs(c.token_budget - DEFAULTS.token_budget), abs(c.max_num_seqs - DEFAULTS.max_num_seqs))
