"""Quadratic in the image side (paper 003, Eq. 3-4) fitted with non-negative coefficients, its R^2,
a hold-out check, a verdict, extrapolation and the inverse question (largest side under a budget).

Memory and time of an inference step do not decrease when the image grows, so the fit is the
least-squares quadratic b0 + b1 x + b2 x^2 with b0, b1, b2 >= 0 (``scipy.optimize.nnls``): it can
neither bend down nor go negative, whatever one noisy point does.  Beyond the largest measured side
the curve is never below the largest measured value (a point the quadratic underestimates still
bounds what a larger image costs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.polynomial import polynomial as P
from scipy.optimize import nnls

#: search range (px) for the largest side a curve allows; 65536 px = 4.3 GP, beyond any sensor
MAX_SIDE = 65536
#: verdict thresholds when a study does not state its own (conf/scaling.yaml ``fit``)
MIN_R2 = 0.98
MAX_HOLDOUT_ERROR = 0.15
GOOD, POOR = "good", "poor"


@dataclass
class Quadratic:
    """y = b0 + b1 x + b2 x^2 fitted to (x, y); x = image side in px.

    For x >= ``floor_x`` (the largest measured side) the value is at least ``floor`` (the largest
    measured value)."""

    b0: float
    b1: float
    b2: float
    r2: float
    n_points: int
    floor: float = 0.0
    floor_x: float = math.inf

    @classmethod
    def fit(cls, x, y) -> "Quadratic":
        """Minimise E = sum_j |p(x_j) - y_j|^2 (Eq. 4) over quadratics with non-negative coefficients.

        The columns are scaled by the largest side first (the constraint is unchanged by positive
        scaling; the normal equations stay well conditioned).  Fewer than 3 distinct sides cannot
        be fitted.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if len(x) < 3 or len(np.unique(x)) < 3:
            raise ValueError(f"a quadratic needs at least 3 distinct resolutions, got {sorted(set(x.tolist()))}")
        scale = float(np.max(np.abs(x))) or 1.0
        u = x / scale
        coef, _ = nnls(np.stack([np.ones_like(u), u, u * u], axis=1), y)
        b0, b1, b2 = float(coef[0]), float(coef[1] / scale), float(coef[2] / scale**2)
        predicted = P.polyval(x, [b0, b1, b2])
        return cls(b0, b1, b2, r_squared(y, predicted), len(x), float(np.max(y)), float(np.max(x)))

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        value = P.polyval(x, [self.b0, self.b1, self.b2])
        return np.where(x >= self.floor_x, np.maximum(value, self.floor), value) if self.floor else value

    def largest_side(self, budget: float, start: int = 1) -> int | None:
        """Largest integer side x in [start, MAX_SIDE] whose whole curve up to x stays <= budget
        (None if even ``start`` exceeds it)."""
        xs = np.arange(start, MAX_SIDE + 1)
        over = np.nonzero(self(xs) > budget)[0]
        if len(over) == 0:
            return MAX_SIDE
        first = int(over[0])
        return int(xs[first - 1]) if first > 0 else None

    def as_dict(self) -> dict:
        return asdict(self)


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination; a constant series fitted exactly has R^2 = 1."""
    residual = float(np.sum((y - predicted) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    scale = max(float(np.max(np.abs(y))), 1e-300)
    if total <= (1e-12 * scale) ** 2 * len(y):
        return 1.0 if residual <= (1e-9 * scale) ** 2 * len(y) else float("nan")
    return 1.0 - residual / total


def holdout_error(x, y) -> dict | None:
    """Fit on all but the largest side, predict it: {'x', 'measured', 'predicted', 'relative_error'}.

    The prediction is the extrapolation as delivered (floored at the largest value fitted).  Needs
    4 sides (3 to fit); None otherwise.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 4:
        return None
    largest = x == x.max()
    curve = Quadratic.fit(x[~largest], y[~largest])
    measured = float(np.mean(y[largest]))
    predicted = float(curve(x.max()))
    relative = abs(predicted - measured) / abs(measured) if measured else (0.0 if predicted == 0 else math.inf)
    return {"x": float(x.max()), "measured": measured, "predicted": predicted, "relative_error": relative}


def judge(r2: float, holdout: dict | None, min_r2: float = MIN_R2, max_holdout_error: float = MAX_HOLDOUT_ERROR) -> tuple[str, list[str]]:
    """('good' | 'poor', reasons): good needs R^2 >= min_r2 and a hold-out error <= max_holdout_error.

    A fit without a hold-out check (fewer than 4 sides) is poor: nothing tested its extrapolation."""
    reasons = []
    if not (r2 >= min_r2):  # NaN fails too
        reasons.append(f"R^2 {r2:.3g} < {min_r2:g}")
    if holdout is None:
        reasons.append("no hold-out check (needs at least 4 sides)")
    elif not (holdout["relative_error"] <= max_holdout_error):
        reasons.append(f"hold-out error {100 * holdout['relative_error']:.3g} % at {holdout['x']:.0f} px "
                       f"> {100 * max_holdout_error:g} %")
    return (POOR if reasons else GOOD), reasons


def verdict_of(fit: dict, thresholds: dict | None = None) -> tuple[str, list[str]]:
    """A fit record's verdict: the one it carries, else judged now (files written before verdicts)."""
    if "verdict" in fit:
        return fit["verdict"], list(fit.get("verdict_reasons", []))
    t = thresholds or {}
    return judge(fit["r2"], fit.get("holdout"), float(t.get("min_r2", MIN_R2)),
                 float(t.get("max_holdout_error", MAX_HOLDOUT_ERROR)))
