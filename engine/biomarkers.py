"""Per-patient scalar endpoints computed from the sampled outputs."""

from __future__ import annotations

import numpy as np


def _trapz(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.sum((y[:, 1:] + y[:, :-1]) * 0.5 * np.diff(t), axis=1)


def _time_above(y: np.ndarray, t: np.ndarray, thr: float) -> np.ndarray:
    """Time above `thr` with linear interpolation between samples (exact for piecewise-linear y)."""
    a, b = y[:, :-1] - thr, y[:, 1:] - thr
    dt = np.diff(t)
    both = (a > 0) & (b > 0)
    cross = (a > 0) != (b > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(a > 0, a / (a - b), b / (b - a))
    part = np.where(both, dt, np.where(cross, frac * dt, 0.0))
    return np.sum(part, axis=1)


def compute(statistic: str, y: np.ndarray, t: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """y [m, T] sampled at times t [T]; rows with any NaN give NaN (failed patients)."""
    with np.errstate(invalid="ignore"):
        if statistic == "max":
            r = y.max(axis=1)
        elif statistic == "min":
            r = y.min(axis=1)
        elif statistic == "last":
            r = y[:, -1].copy()
        elif statistic == "argmax":
            r = t[np.argmax(np.nan_to_num(y, nan=-np.inf), axis=1)].astype(float)
        elif statistic == "argmin":
            r = t[np.argmin(np.nan_to_num(y, nan=np.inf), axis=1)].astype(float)
        elif statistic == "auc":
            r = _trapz(y, t) if len(t) > 1 else np.zeros(len(y))
        elif statistic == "mean":  # time-weighted mean over the sampled window
            r = _trapz(y, t) / (t[-1] - t[0]) if len(t) > 1 else y[:, 0].copy()
        elif statistic == "time_above":
            r = _time_above(y, t, float(threshold)) if len(t) > 1 else np.zeros(len(y))
        else:
            raise ValueError(statistic)
    r[~np.all(np.isfinite(y), axis=1)] = np.nan
    return r


def units(statistic: str, var_unit: str, time_unit: str) -> str:
    if statistic in ("argmax", "argmin", "time_above"):
        return time_unit
    if statistic == "auc":
        return f"{var_unit}*{time_unit}"
    return var_unit
