"""PNG figures of rate sweeps: SLO attainment, TTFT and TPOT against the request rate.

One line (one colour) per sweep, so `splitserve bench plot a.json b.json` overlays, say, the
disaggregated, colocated and chunked runs. matplotlib's Agg canvas, no pyplot: no display, no
global figure state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sweep:
    """The figures of one sweep that the panels need, in increasing rate; None where not measured."""

    label: str
    rates: list[float]
    attainment: list[float | None]
    target: float | None  # None when the run had no SLO
    ttft_slo_ms: float | None
    tpot_slo_ms: float | None
    ttft_p50: list[float | None]
    ttft_p90: list[float | None]
    tpot_p50: list[float | None]
    tpot_p90: list[float | None]

    @classmethod
    def from_json(cls, data: dict[str, Any], default_label: str) -> Sweep:
        points = sorted((p for p in data["points"] if math.isfinite(float(p["rate"]))),
                        key=lambda p: float(p["rate"]))
        reports = [p["report"] for p in points]
        slo = data["config"]["slo"]
        given = slo["ttft_s"] is not None or slo["tpot_s"] is not None
        return cls(label=data["config"].get("label") or default_label,
                   rates=[float(p["rate"]) for p in points],
                   attainment=[r["slo"]["attainment"] if r["slo"] else None for r in reports],
                   target=slo["target"] if given else None,
                   ttft_slo_ms=_ms(slo["ttft_s"]), tpot_slo_ms=_ms(slo["tpot_s"]),
                   ttft_p50=_column(reports, "ttft_ms", "p50"), ttft_p90=_column(reports, "ttft_ms", "p90"),
                   tpot_p50=_column(reports, "tpot_ms", "p50"), tpot_p90=_column(reports, "tpot_ms", "p90"))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _column(reports: list[dict[str, Any]], metric: str, stat: str) -> list[float | None]:
    return [r[metric][stat] for r in reports]


def load_sweep(path: Path, slo=None, overrides: tuple | None = None) -> Sweep:
    """A sweep from a `bench serve --output` file, re-scored under slo (a metrics.Slo) if given, or
    under its own SLOs with the non-None of overrides (ttft_s, tpot_s, target) in their place."""
    try:
        data = json.loads(path.read_text())
        if overrides is not None and any(v is not None for v in overrides):
            slo = with_overrides(data, *overrides)
        if slo is not None:
            data = rescored(data, slo)
        return Sweep.from_json(data, path.stem)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a `bench serve --output` file ({type(exc).__name__}: {exc})") from None


def rescored(data: dict[str, Any], slo) -> dict[str, Any]:
    """The run's document with every point's report recomputed from its records under slo."""
    from splitserve.bench.loadgen.metrics import summarize
    from splitserve.bench.loadgen.records import RequestRecord

    points = []
    for point in data["points"]:
        if "records" not in point:
            raise ValueError("written with --no-records: cannot be re-scored")
        records = [RequestRecord.from_json(r) for r in point["records"]]
        points.append({**point, "report": summarize(records, slo).to_json()})
    config = {**data["config"], "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "target": slo.target}}
    return {**data, "config": config, "points": points}


def with_overrides(data: dict[str, Any], ttft_s, tpot_s, target):
    """The file's own SLOs, with whichever of ttft_s / tpot_s / target is given replacing its own."""
    from splitserve.bench.loadgen.metrics import Slo

    own = data["config"]["slo"]
    return Slo(own["ttft_s"] if ttft_s is None else ttft_s, own["tpot_s"] if tpot_s is None else tpot_s,
               own["target"] if target is None else target)



def plot_sweeps(sweeps: list[Sweep], output: Path, title: str | None = None) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 4.5), layout="constrained")
    attainment, ttft, tpot = figure.subplots(1, 3)
    for i, sweep in enumerate(sweeps):
        colour = f"C{i % 10}"  # the default colour cycle
        _line(attainment, sweep.rates, [None if a is None else 100 * a for a in sweep.attainment],
              colour, "-", sweep.label)
        _line(ttft, sweep.rates, sweep.ttft_p50, colour, "-", f"{sweep.label} P50")
        _line(ttft, sweep.rates, sweep.ttft_p90, colour, "--", f"{sweep.label} P90")
        _line(tpot, sweep.rates, sweep.tpot_p50, colour, "-", f"{sweep.label} P50")
        _line(tpot, sweep.rates, sweep.tpot_p90, colour, "--", f"{sweep.label} P90")
    _targets(attainment, {100 * s.target for s in sweeps if s.target is not None}, "target {:.0f}%")
    _targets(ttft, {s.ttft_slo_ms for s in sweeps if s.ttft_slo_ms is not None}, "SLO {:g} ms")
    _targets(tpot, {s.tpot_slo_ms for s in sweeps if s.tpot_slo_ms is not None}, "SLO {:g} ms")
    _style(attainment, "SLO attainment (%)", "SLO attainment")
    attainment.set_ylim(-2, 102)
    _style(ttft, "TTFT (ms)", "Time to first token")
    _style(tpot, "TPOT (ms)", "Time per output token")
    ttft.set_ylim(bottom=0)
    tpot.set_ylim(bottom=0)
    if title:
        figure.suptitle(title)
    figure.savefig(output, dpi=110)


def _line(axes, rates: list[float], values: list[float | None], colour: str, style: str, label: str) -> None:
    pairs = [(r, v) for r, v in zip(rates, values) if v is not None]
    if pairs:
        axes.plot(*zip(*pairs), color=colour, linestyle=style, marker="o", markersize=4, label=label)


def _targets(axes, values: set[float], label: str) -> None:
    """A dotted horizontal line per distinct target (runs may differ)."""
    for value in sorted(values):
        axes.axhline(value, color="grey", linestyle=":", label=label.format(value))


def _style(axes, ylabel: str, title: str) -> None:
    axes.set_xlabel("request rate (req/s)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")


def run(args) -> int:
    """`splitserve bench plot`: overlay the sweeps of several JSON files in one PNG."""
    if not args.output.resolve().parent.is_dir():
        raise ValueError(f"{args.output}: its folder does not exist")
    overrides = (args.ttft_slo, args.tpot_slo, args.attainment)
    plot_sweeps([load_sweep(path, overrides=overrides) for path in args.inputs], args.output, args.title)
    print(f"wrote {args.output}")
    return 0
