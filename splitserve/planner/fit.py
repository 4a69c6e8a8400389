"""Least-squares fits of the latency models: relative error, non-negative coefficients.

Latencies in one profile span three orders of magnitude (a 10 ms decode step, a 4 s prefill batch),
so every sample's residual is divided by its measured value before squaring: the fit minimises the
squared *relative* error, which is what the simulator's fidelity depends on. Coefficients are held
non-negative (a negative per-token cost extrapolates to negative times), by trying every subset of
the features and keeping the best feasible one: exact non-negative least squares for the 2-4
features these models have. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np


@dataclass(frozen=True)
class FitError:
    """How well a fitted model reproduces its own samples (relative error |pred - y| / y)."""

    num_samples: int
    mean_rel_error: float
    max_rel_error: float
    # The same figure without the non-negativity constraint: how much the constraint cost.
    unconstrained_mean_rel_error: float

    def to_json(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: dict | None) -> FitError | None:
        return None if data is None else cls(**data)


def _solve(x: np.ndarray, y: np.ndarray, columns: tuple[int, ...]) -> np.ndarray:
    """Relative least squares on the given columns; zeros elsewhere."""
    coef = np.zeros(x.shape[1])
    w = x[:, columns] / y[:, None]
    scale = np.abs(w).max(axis=0)  # column scaling: sum(len^2) is ~1e6 times sum(len)
    scale[scale == 0] = 1.0
    sol, *_ = np.linalg.lstsq(w / scale, np.ones_like(y), rcond=None)
    coef[list(columns)] = sol / scale
    return coef


def _rel_errors(x: np.ndarray, y: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return np.abs(x @ coef - y) / y


def fit_linear(features: list[tuple[float, ...]], seconds: list[float]) -> tuple[tuple[float, ...], FitError]:
    """Coefficients k >= 0 minimising sum(((features . k) - y) / y)^2, and the fit's error.

    Needs at least as many samples as features, all with a positive measured time.
    """
    x, y = np.asarray(features, dtype=float), np.asarray(seconds, dtype=float)
    if x.ndim != 2 or len(y) < x.shape[1]:
        raise ValueError(f"need at least {x.shape[-1]} samples to fit {x.shape[-1]} coefficients, got {len(y)}")
    if (y <= 0).any():
        raise ValueError("every measured time must be positive")
    n = x.shape[1]
    free = _solve(x, y, tuple(range(n)))
    best, best_sse = None, np.inf
    for size in range(n, 0, -1):
        for columns in combinations(range(n), size):
            coef = _solve(x, y, columns)
            sse = float((_rel_errors(x, y, coef) ** 2).sum())
            if (coef >= 0).all() and sse < best_sse:
                best, best_sse = coef, sse
    assert best is not None  # a single positive column always yields a positive coefficient
    errors = _rel_errors(x, y, best)
    error = FitError(len(y), float(errors.mean()), float(errors.max()),
                     float(_rel_errors(x, y, free).mean()))
    return tuple(float(c) for c in best), error
