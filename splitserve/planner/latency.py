"""The latency model of one machine type: what `splitserve profile` writes and `simulate` reads.

Per parallelism degree (CPU: cores per worker; GPU: devices per worker), in seconds:

- prefill batch:  a + b * sum(len) + c * sum(len^2)      (linear layers + attention per prompt)
- decode step:    a + b * sum(context) + c * batch        (weights read once + KV read + per row)
- mixed step:     a + b * tokens + c * sum((p+n)^2 - p^2) + d * sum(context)
                  (chunked prefill: chunks of n tokens at prefix p, plus one token per decode;
                  `tokens` counts both; a chunk at p=0 costs what a prompt of n costs in prefill)

plus, per degree, how much slower steps run inside the cluster than alone (StepOverheads) and beside
busy cores (Contention), the KV transfer (latency + bytes / bandwidth) and the cluster's hops and
shared CPU work (Overheads). Every fit keeps its error on its samples (FitError). The file is plain JSON with a format
version, so a profile can also be written by hand, e.g. for a GPU from published step times.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.planner.fit import FitError, fit_linear

FORMAT = "splitserve-profile/1"


@dataclass(frozen=True)
class PrefillModel:
    """Seconds of one prefill batch: a + b * sum(len) + c * sum(len^2) over its prompts."""

    a: float
    b: float
    c: float
    error: FitError | None = None

    def seconds(self, lens: Sequence[int]) -> float:
        return self.a + self.b * sum(lens) + self.c * sum(n * n for n in lens)

    @staticmethod
    def features(lens: Sequence[int]) -> tuple[float, float, float]:
        return 1.0, float(sum(lens)), float(sum(n * n for n in lens))


@dataclass(frozen=True)
class DecodeModel:
    """Seconds of one decode step: a + b * sum(context) + c * batch (context: tokens per sequence)."""

    a: float
    b: float
    c: float
    error: FitError | None = None

    def seconds(self, sum_context: int, batch: int) -> float:
        return self.a + self.b * sum_context + self.c * batch

    @staticmethod
    def features(contexts: Sequence[int]) -> tuple[float, float, float]:
        return 1.0, float(sum(contexts)), float(len(contexts))


@dataclass(frozen=True)
class MixedModel:
    """Seconds of one chunked-prefill step: a + b * tokens + c * attention units + d * sum(context).

    tokens = chunk tokens + one per decode; a chunk of n tokens at prefix p adds (p+n)^2 - p^2
    attention units; sum(context) is over the decodes.
    """

    a: float
    b: float
    c: float
    d: float
    error: FitError | None = None

    def seconds(self, num_tokens: int, attention_units: int, sum_context: int) -> float:
        return self.a + self.b * num_tokens + self.c * attention_units + self.d * sum_context

    @staticmethod
    def features(chunks: Sequence[tuple[int, int]], contexts: Sequence[int]) -> tuple[float, ...]:
        """chunks: (prefix, n) pairs."""
        units = sum((p + n) ** 2 - p * p for p, n in chunks)
        return 1.0, float(sum(n for _, n in chunks) + len(contexts)), float(units), float(sum(contexts))


@dataclass(frozen=True)
class KvTransferModel:
    """Seconds to pull a request's KV blocks: latency_s + bytes / (bandwidth_gbps * 1e9)."""

    latency_s: float
    bandwidth_gbps: float
    transport: str = "ucx"
    error: FitError | None = None

    def seconds(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / (self.bandwidth_gbps * 1e9)


@dataclass(frozen=True)
class Overheads:
    """The cluster's hops around the engine (docs/benchmarks.md "Overhead at low load")."""

    gateway_s: float = 0.0031  # client send -> request in the scheduler's FCFS queue (3 hops)
    rpc_s: float = 0.0015  # one control RPC: Submit, PrefillDone, Release, RequestDone
    reply_s: float = 0.0021  # a step's end -> its token at the client (publish + gateway + stream)
    notes: str = ""
    # CPU seconds the gateway, the scheduler, Redis and the load generator spend per request the
    # gateway admits, per worker step that emits tokens (each is one publish, one read by the gateway
    # and one write to each of its streams, however many sequences it ran) and per output token; on a
    # machine whose cores all run steps it comes out of the workers' (sim_machine.Machine). Measured
    # on two loaded runs or more, the cost is per request and per step (calibrate.py); a profile
    # calibrated on one run has it per token.
    aux_cpu_per_request: float = field(default=0.0, kw_only=True)
    aux_cpu_per_step: float = field(default=0.0, kw_only=True)
    aux_cpu_per_token: float = field(default=0.0, kw_only=True)
    # CPU seconds per byte a prefill server spends sending KV blocks, on its own cores: under load
    # the sends overlap its next steps (sim_engine.SimEngine.charge)
    kv_send_cpu_per_byte: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class StepOverheads:
    """How much slower a worker's steps run inside the cluster than the engine's alone.

    The worker shares its cores with its own event loop, gRPC and UCX threads, and (on a small
    machine) with the gateway, the scheduler, Redis and the load generator, which do work for every
    token. Calibrated on low-load `bench serve` runs of the cluster against the profile's own step
    times (splitserve/planner/calibrate.py); 1.0 and 0 mean no slowdown.
    """

    prefill_factor: float = 1.0  # prefill (and mixed) step time x this
    decode_s: float = 0.0  # + this on every decode and mixed step
    notes: str = ""
    # + this on every step that prefills (a prefill step, a mixed step with chunks); keyword-only so
    # the positional fields above keep their places
    prefill_s: float = field(default=0.0, kw_only=True)


STEP_KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class Contention:
    """How much slower a worker's step runs while the machine's other cores run steps.

    Each field is the fractional slowdown of one kind of step (a mixed step with chunks counts as
    prefill) with every other core running the other kind back to back: the cores share the memory
    system and the last-level cache. `splitserve profile` measures it (measure.py --contention);
    the simulator scales it by the share of the other cores that are busy. 0 means no slowdown, and
    a worker on every core of its machine has no neighbours.
    """

    prefill_beside_prefill: float = 0.0
    prefill_beside_decode: float = 0.0
    decode_beside_prefill: float = 0.0
    decode_beside_decode: float = 0.0
    notes: str = ""

    def slowdown(self, step: str, neighbour: str) -> float:
        return getattr(self, f"{step}_beside_{neighbour}")


@dataclass(frozen=True)
class DegreeProfile:
    """The step-time models of workers with `degree` cores (or devices) each."""

    degree: int
    prefill: PrefillModel
    decode: DecodeModel
    mixed: MixedModel | None = None
    cluster: StepOverheads = field(default_factory=StepOverheads)
    samples: dict[str, list] = field(default_factory=dict)  # raw samples, kept for refits
    contention: Contention = field(default_factory=Contention)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dtype: str
    kv_bytes_per_token: int
    max_model_len: int
    num_layers: int | None = None  # layered prefill's slices are whole layers; None: not known


@dataclass(frozen=True)
class Profile:
    source: str  # how the numbers were obtained: measured by `splitserve profile`, or a placeholder
    machine: dict[str, Any]  # free-form: processor, num_cores, device, when
    model: ModelInfo
    degrees: dict[int, DegreeProfile]
    kv_transfer: KvTransferModel
    overheads: Overheads = field(default_factory=Overheads)
    parallelism: str = "cores per worker"

    def degree(self, n: int) -> DegreeProfile:
        if n not in self.degrees:
            have = ", ".join(map(str, sorted(self.degrees)))
            raise ValueError(f"the profile has no latency model for {n} {self.parallelism} (it has: {have})")
        return self.degrees[n]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "source": self.source, "machine": self.machine,
                "model": vars(self.model), "parallelism": self.parallelism,
                "degrees": {str(k): _degree_json(d) for k, d in sorted(self.degrees.items())},
                "kv_transfer": _model_json(self.kv_transfer), "overheads": vars(self.overheads)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a splitserve profile (format {data.get('format')!r}, expected {FORMAT!r})")
        degrees = {int(k): _degree_from_json(int(k), d) for k, d in data["degrees"].items()}
        if not degrees:
            raise ValueError("the profile has no degrees")
        return cls(source=data["source"], machine=data.get("machine", {}), model=ModelInfo(**data["model"]),
                   degrees=degrees, kv_transfer=_model_from_json(KvTransferModel, data["kv_transfer"]),
                   overheads=Overheads(**data.get("overheads", {})),
                   parallelism=data.get("parallelism", "cores per worker"))


def _model_json(model) -> dict[str, Any]:
    out = {k: v for k, v in vars(model).items() if k != "error"}
    return {**out, "fit": model.error.to_json() if model.error else None}


def _model_from_json(cls, data: dict[str, Any]):
    values = {k: v for k, v in data.items() if k != "fit"}
    return cls(**values, error=FitError.from_json(data.get("fit")))


def _degree_json(d: DegreeProfile) -> dict[str, Any]:
    return {"prefill": _model_json(d.prefill), "decode": _model_json(d.decode),
            "mixed": _model_json(d.mixed) if d.mixed else None, "cluster": vars(d.cluster),
            "contention": vars(d.contention), "samples": d.samples}


def _degree_from_json(degree: int, data: dict[str, Any]) -> DegreeProfile:
    mixed = data.get("mixed")
    return DegreeProfile(degree, _model_from_json(PrefillModel, data["prefill"]),
                         _model_from_json(DecodeModel, data["decode"]),
                         _model_from_json(MixedModel, mixed) if mixed else None,
                         StepOverheads(**data.get("cluster", {})), data.get("samples", {}),
                         Contention(**data.get("contention", {})))


def load_profile(path: str | Path) -> Profile:
    try:
        return Profile.from_json(json.loads(Path(path).read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable splitserve profile ({exc})") from exc


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_json(), indent=1) + "\n")


# -- fitting from samples -------------------------------------------------------------------------
# Sample layouts (as kept in DegreeProfile.samples):
#   prefill: {"lens": [prompt lengths of the batch], "s": seconds}
#   decode:  {"contexts": [tokens of each sequence], "s": seconds}
#   mixed:   {"chunks": [[prefix, n], ...], "contexts": [...], "s": seconds}
#   kv:      {"bytes": n, "s": seconds}


def fit_prefill(samples: list[dict]) -> PrefillModel:
    coef, error = fit_linear([PrefillModel.features(s["lens"]) for s in samples], [s["s"] for s in samples])
    return PrefillModel(*coef, error=error)


def fit_decode(samples: list[dict]) -> DecodeModel:
    coef, error = fit_linear([DecodeModel.features(s["contexts"]) for s in samples], [s["s"] for s in samples])
    return DecodeModel(*coef, error=error)


def fit_mixed(samples: list[dict]) -> MixedModel:
    features = [MixedModel.features([tuple(c) for c in s["chunks"]], s["contexts"]) for s in samples]
    coef, error = fit_linear(features, [s["s"] for s in samples])
    return MixedModel(*coef, error=error)


def fit_kv(samples: list[dict], transport: str) -> KvTransferModel:
    (latency, per_byte), error = fit_linear([(1.0, float(s["bytes"])) for s in samples], [s["s"] for s in samples])
    if per_byte <= 0:
        raise ValueError("the KV transfer samples show no cost per byte: measure larger payloads")
    return KvTransferModel(latency, 1.0 / per_byte / 1e9, transport, error)


def fit_degree(degree: int, samples: dict[str, list], cluster: StepOverheads | None = None) -> DegreeProfile:
    mixed = fit_mixed(samples["mixed"]) if samples.get("mixed") else None
    contention = fit_contention(samples["contention"]) if samples.get("contention") else Contention()
    return DegreeProfile(degree, fit_prefill(samples["prefill"]), fit_decode(samples["decode"]), mixed,
                         cluster or StepOverheads(), samples, contention)


# contention samples: {"alone": {"prefill": [...], "decode": [...]}, "beside prefill": {...},
# "beside decode": {...}}, each list in the layouts above, the same shapes in the same order.


def fit_contention(samples: dict[str, dict[str, list]]) -> Contention:
    """Each slowdown: the mean over its shapes of (time beside busy cores / time alone) - 1, >= 0."""
    alone = samples["alone"]
    slowdowns, lines = {}, []
    for neighbour in STEP_KINDS:
        beside = samples[f"beside {neighbour}"]
        for step in STEP_KINDS:
            ratios = [b["s"] / a["s"] for a, b in zip(alone[step], beside[step], strict=True)]
            slowdowns[f"{step}_beside_{neighbour}"] = round(max(0.0, sum(ratios) / len(ratios) - 1.0), 4)
            lines.append(f"{step} beside {neighbour}: x" + " ".join(f"{r:.3f}" for r in ratios))
    return Contention(**slowdowns, notes="measured by `splitserve profile`, step time beside busy cores / "
                                         "alone, per shape: " + "; ".join(lines))
