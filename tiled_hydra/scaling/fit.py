"""Least-squares quadratic in the image side (paper 003, Eq. 3-4), its R^2, a hold-out check,
extrapolation and the inverse question (largest side under a budget)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.polynomial import polynomial as P

#: search range (px) for the largest side a curve allows; 65536 px = 4.3 GP, beyond any sensor
MAX_SIDE = 65536


@dataclass
class Quadratic:
    """y = b0 + b1 x + b2 x^2 fitted to (x, y); x = image side in px."""

    b0: float
    b1: float
    b2: float
    r2: float
    n_points: int

    @classmethod
    def fit(cls, x, y) -> "Quadratic":
        """Minimise E = sum_j |p(x_j) - y_j|^2 over polynomials of degree 2 (Eq. 4).

        Three points determine the quadratic exactly; fewer cannot be fitted.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if len(x) < 3 or len(np.unique(x)) < 3:
            raise ValueError(f"a quadratic needs at least 3 distinct resolutions, got {sorted(set(x.tolist()))}")
        b0, b1, b2 = P.polyfit(x, y, 2)
        return cls(float(b0), float(b1), float(b2), r_squared(y, P.polyval(x, [b0, b1, b2])), len(x))

    def __call__(self, x):
        return P.polyval(np.asarray(x, dtype=np.float64), [self.b0, self.b1, self.b2])

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

    Needs 4 sides (3 to fit); None otherwise.
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
