"""Subgroup analysis of a trial run: endpoint means per arm and subgroup, differences from the
reference arm with normal-approximation 95 % confidence intervals, and a forest plot.

The trial design is read from the job text stored in the result (root attribute `job_toml`), so a
result file carries everything its analysis needs. All reductions are one `dask.compute`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis import biomarker_names, flags, open_run

Z95 = 1.959963984540054


def _trial(ds) -> dict:
    text = ds.attrs.get("job_toml")
    if not text:
        return {}
    return tomllib.loads(text).get("trial", {})


def _var(ds, h5_path: str):
    for name, v in ds.data_vars.items():
        if v.attrs.get("h5_path") == h5_path:
            return v
    return None


def _levels(ds, trial: dict):
    """(subgroup name, level label, lazy boolean mask) including 'all patients'."""
    out = [("all", "all patients", None)]
    for name, spec in trial.get("subgroups", {}).items():
        v = _var(ds, f"cohort/{name}")
        if v is None:
            continue
        fl = flags(v)
        if fl:  # categorical: one level per category
            for code, label in sorted(fl.items()):
                out.append((name, f"{name}={label}", v.data == code))
        elif isinstance(spec, list):
            from .trial import band_labels

            x = v.data
            for k, label in enumerate(band_labels(name, spec)):
                lo, hi = spec[k], spec[k + 1]
                last = k == len(spec) - 2
                out.append((name, label, (x >= lo) & ((x <= hi) if last else (x < hi))))
    return out


def subgroup_table(path: str | os.PathLike, chunks: int | None = None) -> pd.DataFrame:
    """One row per (endpoint, subgroup level, arm): n, mean, sd over ok patients; diff vs reference."""
    import dask

    ds = open_run(path, chunks=chunks)
    trial = _trial(ds)
    arm_flags = {k: v for k, v in flags(ds["arm"]).items() if k >= 0}
    ref = trial.get("reference_arm") or arm_flags[min(arm_flags)]
    endpoints = [trial["primary"]] if trial.get("primary") else biomarker_names(ds)
    ok = ds["status"].data == 0
    arm = ds["arm"].data
    lazy = {}
    for ep in endpoints:
        x = _var(ds, f"biomarkers/{ep}").data
        finite = ok & np.isfinite(x)
        x0 = np.where(finite, x, 0.0)
        for sg, label, mask in _levels(ds, trial):
            base = finite if mask is None else finite & mask
            for code, name in arm_flags.items():
                sel = base & (arm == code)
                lazy[(ep, sg, label, name)] = (sel.sum(), np.where(sel, x0, 0.0).sum(), np.where(sel, x0 * x0, 0.0).sum())
    (vals,) = dask.compute(lazy)
    rows = []
    for (ep, sg, label, name), (n, s1, s2) in vals.items():
        n = int(n)
        mean = s1 / n if n else np.nan
        var = (s2 - n * mean * mean) / (n - 1) if n > 1 else np.nan
        rows.append(dict(endpoint=ep, subgroup=sg, level=label, arm=name, n=n, mean=mean,
                         sd=np.sqrt(max(var, 0.0)) if np.isfinite(var) else np.nan))
    df = pd.DataFrame(rows)
    refs = df[df.arm == ref].set_index(["endpoint", "level"])
    diff, lo, hi = [], [], []
    for r in df.itertuples():
        q = refs.loc[(r.endpoint, r.level)]
        qn, qm, qs = q["n"], q["mean"], q["sd"]
        se = np.sqrt(r.sd ** 2 / r.n + qs ** 2 / qn) if r.n > 1 and qn > 1 else np.nan
        d = r.mean - qm if r.arm != ref else np.nan
        diff.append(d)
        lo.append(d - Z95 * se if r.arm != ref else np.nan)
        hi.append(d + Z95 * se if r.arm != ref else np.nan)
    df["diff_vs_ref"], df["ci_low"], df["ci_high"] = diff, lo, hi
    df.attrs["reference_arm"] = ref
    ds.close()
    return df


def subgroup_text(path: str | os.PathLike) -> str:
    df = subgroup_table(path)
    ref = df.attrs["reference_arm"]
    lines = [f"Subgroups (mean over ok patients; difference from {ref} with 95 % CI)"]
    for ep, g in df.groupby("endpoint", sort=False):
        lines.append(f"  {ep}")
        for r in g.itertuples():
            d = "" if r.arm == ref else f"   diff {r.diff_vs_ref:+.4g} [{r.ci_low:+.4g}, {r.ci_high:+.4g}]"
            lines.append(f"    {r.level:<24} {r.arm:<16} n={r.n:<7} mean {r.mean:.4g} (sd {r.sd:.3g}){d}")
    return "\n".join(lines) + "\n"


def forest_plot(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    df = subgroup_table(path)
    ref = df.attrs["reference_arm"]
    written = []
    for ep, g in df.groupby("endpoint", sort=False):
        g = g[g.arm != ref]
        arms = list(dict.fromkeys(g.arm))
        levels = list(dict.fromkeys(g.level))
        fig = Figure(figsize=(8, 1.2 + 0.42 * len(levels) * max(len(arms), 1)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ypos, ylab = [], []
        y = 0.0
        for lv in levels:
            for k, a in enumerate(arms):
                r = g[(g.level == lv) & (g.arm == a)].iloc[0]
                ax.errorbar(r.diff_vs_ref, y, xerr=[[r.diff_vs_ref - r.ci_low], [r.ci_high - r.diff_vs_ref]],
                            fmt="s" if lv == "all patients" else "o", color=f"C{k % 10}",
                            label=a if lv == levels[0] else None, capsize=3)
                ypos.append(y)
                ylab.append(f"{lv}  (n={r.n})" if len(arms) == 1 else f"{lv} · {a}")
                y -= 1
            y -= 0.5
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(ypos, ylab)
        ax.set_xlabel(f"difference in mean {ep} vs {ref} (95 % CI)")
        ax.set_title(f"{ep}: treatment difference by subgroup")
        if len(arms) > 1:
            ax.legend(loc="best")
        ax.grid(True, axis="x", alpha=0.3)
        target = Path(out_dir) / f"forest_{ep}.png"
        fig.savefig(target, dpi=110)
        written.append(target)
    return written
