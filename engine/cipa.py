"""TdP risk classification from a cardiac-cell screen (engine/cell_screen.py), CiPA style.

Metric (Li et al. 2019, Clin. Pharmacol. Ther. 105:466): the qNet torsade metric score of a drug
is qNet averaged over the concentrations `metric_multiples` (1-4x EFTPC); computed per cell, and
per drug as the mean over the cells. Lower qNet means more net inward charge, i.e. higher risk.

Thresholds: a proportional-odds (ordinal logistic) model P(risk >= k | x) = sigmoid(a_k - b x),
k in {intermediate, high}, fitted by maximum likelihood on the *training drugs only* (every cell
of every training drug is one observation, as Li et al. used their uncertainty samples). The two
thresholds are where the fitted cumulative probabilities cross 1/2: x_k = a_k / b. A weak
Gaussian prior on b (sd 100 in units of 1 / sd(x)) keeps the fit finite when the training drugs
are perfectly separated by the metric (then the thresholds fall between the classes, where the
data put them, instead of running off to infinity). Validation drugs never enter the fit.

Scores: 3-class accuracy (high / intermediate / low) on training and validation drugs, and the
AUC of the metric for "high vs the rest" and "high or intermediate vs low" (Mann-Whitney, ties
counted 1/2). A second, rule-based signal: the fraction of the population with EADs or
repolarisation failure at any concentration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy.optimize import minimize

from .cell_screen import RISK_LEVELS


@dataclass
class DrugScore:
    name: str
    set: str
    risk: str
    metric: float  # population mean of the per-cell qNet metric (uC/uF)
    metric_cells: np.ndarray  # per-cell metric
    qnet_by_multiple: dict[float, float]  # population mean qNet at each multiple
    ead_rf_fraction: float  # fraction of cells with an EAD or repolarisation failure at any multiple
    predicted: str = ""


def load_scores(path: str | os.PathLike) -> tuple[list[DrugScore], dict]:
    """Per-drug scores from a screen's RUN.h5 (read with h5py: 1-D arrays only)."""
    p = Path(path)
    p = p / "RUN.h5" if p.is_dir() else p
    with h5py.File(p, "r") as f:
        if "screen" not in f:
            raise ValueError(f"{p}: not a cardiac-cell screen (no screen/ group)")
        drug = f["screen/drug"][:]
        a = f["screen/drug"].attrs
        names = str(a["flag_meanings"]).split()[1:]  # first is "control"
        sets = [x if x != "-" else "" for x in str(a.get("drug_set", "")).split()] or [""] * len(names)
        risks = [x if x != "unknown" else "" for x in str(a.get("tdp_risk", "")).split()] or [""] * len(names)
        metric_mult = np.asarray(a.get("metric_multiples", [1.0, 2.0, 3.0, 4.0]), float)
        mult = f["screen/multiple"][:]
        cell = f["screen/cell"][:]
        qnet = f["biomarkers/qNet"][:]
        bad = (f["biomarkers/EAD"][:] > 0) | (f["biomarkers/repolarisation_failure"][:] > 0)
        status = f["status"][:]
        acc = f["biomarkers/accepted"][:] > 0 if "accepted" in f["biomarkers"] else np.ones(drug.size, bool)
        control = qnet[(drug == -1) & (status == 0) & acc]
    cells = np.unique(cell[acc])  # cells rejected by pacing.accept take no part in the metric
    out = []
    for i, name in enumerate(names):
        sel = (drug == i) & acc
        if not sel.any():
            continue
        # per cell: mean over the metric multiples (NaN if any of them failed)
        per_cell = []
        for c in cells:
            v = [qnet[sel & (cell == c) & (mult == m)] for m in metric_mult]
            vals = [x[0] if x.size else np.nan for x in v]
            per_cell.append(np.mean(vals))
        per_cell = np.array(per_cell)
        by_mult = {float(m): float(np.nanmean(qnet[sel & (mult == m)])) for m in np.unique(mult[sel])}
        frac = float(np.mean([bad[sel & (cell == c)].any() for c in cells]))
        out.append(DrugScore(name, sets[i] if i < len(sets) else "", risks[i] if i < len(risks) else "",
                             float(np.nanmean(per_cell)) if np.isfinite(per_cell).any() else np.nan,
                             per_cell, by_mult, frac))
    info = {"control_qnet": float(np.mean(control)) if control.size else np.nan,
            "n_rejected_cells": int(np.unique(cell).size - cells.size),
            "metric_multiples": metric_mult.tolist(), "n_cells": int(cells.size)}
    return out, info


# ------------------------------------------------------------------------------- ordinal fit
def fit_ordinal(x: np.ndarray, y: np.ndarray, prior_sd: float = 100.0) -> tuple[float, np.ndarray]:
    """Proportional-odds fit of y in {0 low, 1 intermediate, 2 high} on x (lower x, higher risk):
    P(y >= k) = sigmoid(a_k - b x), k = 1, 2, a_1 > a_2. Returns (b, thresholds x_k = a_k / b),
    thresholds in increasing order of risk [x_1 (>= intermediate), x_2 (high)]."""
    x = np.asarray(x, float)
    y = np.asarray(y, int)
    ok = np.isfinite(x)
    x, y = x[ok], y[ok]
    if len(np.unique(y)) < 3:
        raise ValueError("ordinal fit needs training drugs of all three risk levels")
    mu, sd = x.mean(), x.std() or 1.0
    z = (x - mu) / sd

    def unpack(th):
        b = th[0]
        a1 = th[1]
        a2 = a1 - np.exp(th[2])  # a2 < a1: reaching "high" is harder than "intermediate"
        return b, a1, a2

    def nll(th):
        b, a1, a2 = unpack(th)
        p1 = _sigmoid(a1 - b * z)  # P(y >= 1)
        p2 = _sigmoid(a2 - b * z)  # P(y >= 2)
        pr = np.where(y == 0, 1 - p1, np.where(y == 1, p1 - p2, p2))
        return -np.sum(np.log(np.clip(pr, 1e-300, None))) + 0.5 * (b / prior_sd) ** 2

    best = None
    for b0 in (1.0, 5.0, 20.0):
        r = minimize(nll, np.array([b0, 0.5, 0.0]), method="Nelder-Mead",
                     options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 40000})
        if best is None or r.fun < best.fun:
            best = r
    b, a1, a2 = unpack(best.x)
    if b <= 0:
        raise ValueError("ordinal fit: the metric does not decrease with risk in the training drugs")
    # back to x units: a - b z = a - b (x - mu)/sd  ->  crosses 0 at x = mu + sd a / b
    return float(b / sd), np.array([mu + sd * a1 / b, mu + sd * a2 / b])


def _sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def classify(metric: float, thresholds: np.ndarray) -> str:
    if not np.isfinite(metric):
        return "high"  # no usable beat at therapeutic concentrations: treat as the highest risk
    if metric < thresholds[1]:
        return "high"
    if metric < thresholds[0]:
        return "intermediate"
    return "low"


def auc(score_pos: np.ndarray, score_neg: np.ndarray) -> float:
    """P(a random positive scores higher than a random negative), ties 1/2 (Mann-Whitney U / n1 n2)."""
    p, n = np.asarray(score_pos, float), np.asarray(score_neg, float)
    if p.size == 0 or n.size == 0:
        return float("nan")
    gt = (p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()
    return float(gt / (p.size * n.size))


def evaluate(path: str | os.PathLike) -> dict:
    """Fit thresholds on the training drugs, classify all, score training and validation."""
    drugs, info = load_scores(path)
    train = [d for d in drugs if d.set == "training" and d.risk]
    if not train:
        raise ValueError("no training drugs with a TdP risk label in the screen")
    x = np.concatenate([d.metric_cells for d in train])
    y = np.concatenate([np.full(d.metric_cells.size, RISK_LEVELS.index(d.risk)) for d in train])
    slope, thr = fit_ordinal(x, y)
    for d in drugs:
        d.predicted = classify(d.metric, thr)
    res = {"thresholds": {"high_below": float(thr[1]), "intermediate_below": float(thr[0])}, "slope": slope,
           "info": info, "drugs": drugs, "sets": {}}
    for s in ("training", "validation"):
        ds = [d for d in drugs if d.set == s and d.risk]
        if not ds:
            continue
        risk_score = -np.array([d.metric if np.isfinite(d.metric) else -np.inf for d in ds])  # higher = riskier
        lab = np.array([RISK_LEVELS.index(d.risk) for d in ds])
        res["sets"][s] = {
            "n": len(ds),
            "accuracy": float(np.mean([d.predicted == d.risk for d in ds])),
            "auc_high_vs_rest": auc(risk_score[lab == 2], risk_score[lab < 2]),
            "auc_high_or_intermediate_vs_low": auc(risk_score[lab >= 1], risk_score[lab == 0]),
        }
    return res


def summary_text(path: str | os.PathLike) -> str:
    r = evaluate(path)
    th = r["thresholds"]
    lines = [f"TdP risk (qNet metric = mean qNet over {r['info']['metric_multiples']} x EFTPC, "
             f"{r['info']['n_cells']} accepted cell(s), {r['info']['n_rejected_cells']} rejected; control qNet {r['info']['control_qnet']:.4f} uC/uF)",
             f"thresholds fitted on training drugs only: high if metric < {th['high_below']:.4f}, "
             f"intermediate if < {th['intermediate_below']:.4f}, else low",
             f"{'drug':<16}{'set':<12}{'CiPA risk':<14}{'metric':>9}  {'predicted':<14}{'EAD/RF cells':>12}"]
    order = {"training": 0, "validation": 1}
    for d in sorted(r["drugs"], key=lambda d: (order.get(d.set, 2), -RISK_LEVELS.index(d.risk) if d.risk else 0, d.name)):
        mark = "" if not d.risk else ("  ok" if d.predicted == d.risk else "  MISS")
        lines.append(f"{d.name:<16}{d.set:<12}{d.risk:<14}{d.metric:>9.4f}  {d.predicted:<14}"
                     f"{100 * d.ead_rf_fraction:>11.0f}%{mark}")
    for s, v in r["sets"].items():
        lines.append(f"{s}: {v['n']} drugs, accuracy {100 * v['accuracy']:.1f}%, AUC high vs rest "
                     f"{v['auc_high_vs_rest']:.3f}, AUC high+intermediate vs low {v['auc_high_or_intermediate_vs_low']:.3f}")
    return "\n".join(lines)


def report_plots(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r = evaluate(path)
    colours = {"high": "tab:red", "intermediate": "tab:orange", "low": "tab:green", "": "tab:gray"}
    written = []

    fig = Figure(figsize=(9, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for d in r["drugs"]:
        ms = sorted(d.qnet_by_multiple)
        ax.plot(ms, [d.qnet_by_multiple[m] for m in ms], marker="o", ms=3, lw=1, color=colours[d.risk], alpha=0.8,
                ls="-" if d.set == "training" else "--")
    ax.axhline(r["info"]["control_qnet"], color="k", lw=0.8, ls=":", label="control")
    ax.set_xscale("log")
    ax.set_xlabel("concentration (multiple of EFTPC)")
    ax.set_ylabel("qNet (uC/uF)")
    ax.set_title("qNet against concentration (solid: training, dashed: validation; colour: CiPA risk)")
    for k in ("high", "intermediate", "low"):
        ax.plot([], [], color=colours[k], label=k)
    ax.legend(frameon=False)
    p = out_dir / "cipa_qnet_vs_concentration.png"
    fig.savefig(p, dpi=120)
    written.append(p)

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ds = sorted(r["drugs"], key=lambda d: d.metric if np.isfinite(d.metric) else -1)
    for i, d in enumerate(ds):
        ax.scatter([i], [d.metric], color=colours[d.risk], marker="o" if d.set == "training" else "s", zorder=3)
        if d.metric_cells.size > 1:
            ax.plot([i, i], np.nanpercentile(d.metric_cells, [5, 95]), color=colours[d.risk], lw=1)
    th = r["thresholds"]
    ax.axhline(th["high_below"], color="tab:red", ls="--", lw=1, label="high / intermediate threshold")
    ax.axhline(th["intermediate_below"], color="tab:orange", ls="--", lw=1, label="intermediate / low threshold")
    ax.set_xticks(range(len(ds)), [d.name for d in ds], rotation=70, fontsize=8)
    ax.set_ylabel("qNet metric (uC/uF)")
    acc = " · ".join(f"{s} accuracy {100 * v['accuracy']:.0f}%" for s, v in r["sets"].items())
    ax.set_title(f"TdP metric per drug (o training, s validation); {acc}")
    ax.legend(frameon=False, fontsize=8)
    p = out_dir / "cipa_tdp_metric.png"
    fig.savefig(p, dpi=120)
    written.append(p)
    return written
