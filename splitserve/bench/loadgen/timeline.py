"""`splitserve bench timeline`: how prefills interfere with running decodes, one panel per run.

For one rate of each `bench serve --output` file: every inter-token gap of every request, plotted at
the time it ended (the TPOT its running decodes were getting at that moment), over the arrivals of
new prompts (a tick per request, taller for longer prompts). In a colocated worker each long prompt
shows as a column of stalled decodes; on a disaggregated cluster the decodes do not see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Timeline:
    label: str
    rate: float
    gaps: list[tuple[float, float]]  # (time the token arrived, s; gap since the previous token, ms)
    arrivals: list[tuple[float, int]]  # (send time, s; prompt tokens)

    def interrupted_share(self, threshold_ms: float) -> float:
        """Fraction of the gaps longer than threshold_ms: tokens held up by something else."""
        return sum(g > threshold_ms for _, g in self.gaps) / len(self.gaps) if self.gaps else 0.0


def load_timeline(path: Path, rate: float) -> Timeline:
    data = json.loads(path.read_text())
    points = [p for p in data["points"] if float(p["rate"]) == rate]
    if not points or "records" not in points[0]:
        rates = ", ".join(str(p["rate"]) for p in data["points"])
        raise ValueError(f"{path}: no point with records at rate {rate:g} (rates: {rates})")
    return timeline_from_records(data["config"].get("label") or path.stem, rate, points[0]["records"])


def timeline_from_records(label: str, rate: float, records: list[dict[str, Any]]) -> Timeline:
    gaps, arrivals = [], []
    for record in records:
        if record.get("send_s") is not None:
            arrivals.append((record["send_s"], record.get("prompt_tokens") or record["input_len"]))
        times = [] if record.get("error") else record.get("chunk_times_s") or []
        gaps += [(b, 1e3 * (b - a)) for a, b in pairwise(times)]
    return Timeline(label, rate, sorted(gaps), sorted(arrivals))


def plot_timelines(timelines: list[Timeline], output: Path, window: tuple[float, float] | None,
                   slo_ms: float | None, title: str | None) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 3.2 * len(timelines)), layout="constrained")
    axes_list = figure.subplots(len(timelines), 1, sharex=True, squeeze=False)[:, 0]
    top = max((g for t in timelines for _, g in _within(t.gaps, window)), default=100.0) * 1.1
    longest = max((n for t in timelines for _, n in t.arrivals), default=1)
    for i, (axes, timeline) in enumerate(zip(axes_list, timelines)):
        xs, ys = zip(*_within(timeline.gaps, window)) if timeline.gaps else ((), ())
        axes.scatter(xs, ys, s=4, color=f"C{i % 10}", label="inter-token gap of a running request")
        for t, n in _within(timeline.arrivals, window):
            axes.axvline(t, ymin=0, ymax=0.04 + 0.16 * n / longest, color="black", alpha=0.35, linewidth=1)
        if slo_ms is not None:
            axes.axhline(slo_ms, color="grey", linestyle=":", label=f"TPOT SLO {slo_ms:g} ms")
        axes.set_ylim(0, top)
        axes.set_ylabel("gap (ms)")
        axes.set_title(f"{timeline.label} at {timeline.rate:g} req/s (ticks: prompt arrivals, taller = longer)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small", loc="upper right")
    axes_list[-1].set_xlabel("time since the first arrival (s)")
    if window:
        axes_list[-1].set_xlim(*window)
    if title:
        figure.suptitle(title)
    figure.savefig(output, dpi=110)


def _within(pairs, window):
    return [(t, v) for t, v in pairs if window is None or window[0] <= t <= window[1]]


def run(args) -> int:
    timelines = [load_timeline(path, args.rate) for path in args.inputs]
    window = tuple(args.window) if args.window else None
    plot_timelines(timelines, args.output, window, args.tpot_slo * 1e3 if args.tpot_slo else None, args.title)
    for t in timelines:
        share = t.interrupted_share(args.stall_ms)
        print(f"{t.label}: {len(t.gaps)} gaps, {100 * share:.1f}% longer than {args.stall_ms:g} ms")
    print(f"wrote {args.output}")
    return 0
