"""`twin summary` of a calibration run: population estimates, individual estimates with their
intervals, fit flags, and every alert with its time, probability and evidence."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np


def _master(path) -> Path:
    p = Path(path)
    return p / "RUN.h5" if p.is_dir() else p


def is_calibration(path) -> bool:
    try:
        with h5py.File(_master(path), "r") as f:
            return f.attrs.get("kind") == "calibration"
    except OSError:
        return False


def alerts(path) -> list[dict]:
    """Every raised alert: rule, patient (index and pseudonym prefix), time, probability, evidence."""
    out = []
    with h5py.File(_master(path), "r") as f:
        if "alerts" not in f:
            return out
        t = f["time"][:]
        ps = f["cohort/pseudonym"][:]
        g = f["alerts"]
        fc = f["forecast"] if "forecast" in f else None
        for name in sorted(k for k in g if not k.endswith(("_probability", "_lead"))):
            a = g[name][:]
            p = g[f"{name}_probability"][:]
            lead = g[f"{name}_lead"][:]
            out_name = next((k[: -len("_analysis")] for k in (fc or {}) if k.endswith("_analysis")), None)
            obs = f[f"observed/{out_name}"][:] if out_name and f"observed/{out_name}" in f else None
            an = fc[f"{out_name}_analysis"][:] if out_name else None
            h30 = fc[f"{out_name}_h30_p50"][:] if out_name and f"{out_name}_h30_p50" in fc else None
            for i, k in zip(*np.nonzero(a)):
                ev = {}
                if obs is not None:
                    ev["observed"] = float(obs[i, k])
                if an is not None:
                    ev["analysis"] = float(an[i, k])
                if h30 is not None:
                    ev["forecast_30_p50"] = float(h30[i, k])
                ev["predicted_lead"] = float(lead[i, k])
                out.append({"rule": name, "patient": int(i), "pseudonym": ps[i].decode()[:12], "time": float(t[k]),
                            "probability": float(p[i, k]), "evidence": ev,
                            "definition": g[name].attrs.get("long_name", "")})
    return out


def summary_text(path) -> str:
    lines = []
    with h5py.File(_master(path), "r") as f:
        a = f.attrs
        lines.append(f"calibration {a.get('job_name')}: model {a.get('model')}, {a.get('n_patients')} twins, "
                     f"observations sha256 {str(a.get('observations_sha256'))[:16]} ({a.get('observations_format')}), "
                     f"{a.get('n_imported')}/{a.get('n_records')} records imported, {a.get('n_import_issues')} rejected "
                     f"(import_issues.csv), {a.get('n_excluded_no_consent')} patients without consent, "
                     f"{a.get('n_registry_without_records', 0)} consenting patients without an importable record")
        st = f["status"]
        names = st.attrs["flag_meanings"].split()
        vals = list(st.attrs["flag_values"])
        s = st[:]
        lines.append("fit status: " + ", ".join(f"{names[vals.index(c)]} {int((s == c).sum())}" for c in np.unique(s)))
        pop = a.get("population", "")
        if pop:
            d = json.loads(pop)
            lines.append(f"population ({d['method']}; {d['iterations']} iterations, converged {d['converged']}):")
            for p, tv, cv in zip(d["parameters"], d["typical"], d["cv_percent"]):
                lines.append(f"  {p:>10} typical {tv:.4g}   between-subject CV {cv:.1f}%")
            lines.append(f"  residual sd: additive {d['err_add']}, proportional {d['err_prop']}")
        prior = json.loads(a.get("prior", "{}"))
        lines.append("individual MAP estimates (median [p5, p95] over twins; mean 95% interval width factor):")
        ok = s == 0
        for p in prior.get("parameters", []):
            v = f[f"cohort/{p}"][:][ok]
            sd = f[f"calibration/{p}_sd_log"][:][ok]
            if v.size:
                q = np.quantile(v, [0.5, 0.05, 0.95])
                lines.append(f"  {p:>10} {q[0]:.4g} [{q[1]:.4g}, {q[2]:.4g}]   x/÷ {np.exp(1.96 * sd).mean():.3g}")
        chi = f["calibration/chi2"][:][ok]
        n = f["calibration/n_obs"][:][ok]
        if n.sum():
            lines.append(f"goodness of fit: weighted residual sum / observations = {chi.sum() / n.sum():.3f}")
    al = alerts(path)
    if al or is_calibration(path):
        lines.append(f"alerts: {len(al)}")
        for x in al[:50]:
            ev = ", ".join(f"{k} {v:.4g}" for k, v in x["evidence"].items())
            lines.append(f"  {x['rule']:<12} twin {x['patient']:>5} ({x['pseudonym']}) t={x['time']:g}  "
                         f"P={x['probability']:.2f}  evidence: {ev}")
        if len(al) > 50:
            lines.append(f"  ... {len(al) - 50} more")
    return "\n".join(lines)
