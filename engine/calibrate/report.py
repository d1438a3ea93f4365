"""`twin report` of a calibration run: individual fits, residual diagnostics, forecasts/alerts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def report(path, out_dir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    master = p / "RUN.h5" if p.is_dir() else p
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with h5py.File(master, "r") as f:
        t = f["time"][:]
        tu = f["time"].attrs.get("units", "")
        outputs = [k for k in f["observed"]]
        st = f["status"][:]
        for o in outputs:
            y, pred, res = f[f"observed/{o}"][:], f[o][:], f[f"residuals/{o}"][:]
            unit = f[o].attrs.get("units", "")
            n = min(len(y), 12)
            cols = 4 if n > 4 else n
            rows = -(-n // cols)
            fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
            for i in range(rows * cols):
                ax = axes.flat[i]
                if i >= n:
                    ax.axis("off")
                    continue
                m = np.isfinite(y[i])
                ax.plot(t[m], y[i, m], "o", ms=3, label="observed")
                ax.plot(t, pred[i], "-", lw=1.2, label="MAP twin")
                ax.set_title(f"twin {i}" + ("" if st[i] == 0 else f" (status {st[i]})"), fontsize=9)
            axes.flat[0].legend(fontsize=7)
            fig.supxlabel(f"time [{tu}]")
            fig.supylabel(f"{o} [{unit}]")
            fig.tight_layout()
            paths.append(_save(fig, out / f"fits_{o}.png"))
            fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
            ok = np.isfinite(res)
            tt = np.broadcast_to(t, res.shape)
            ax[0].scatter(tt[ok], res[ok], s=5, alpha=0.6)
            ax[0].axhline(0, color="k", lw=0.8)
            ax[0].set(xlabel=f"time [{tu}]", ylabel="weighted residual", title="residuals vs time")
            ax[1].scatter(pred[ok], res[ok], s=5, alpha=0.6)
            ax[1].axhline(0, color="k", lw=0.8)
            ax[1].set(xlabel=f"predicted {o} [{unit}]", ylabel="weighted residual", title="residuals vs prediction")
            from scipy.stats import norm

            r = np.sort(res[ok])
            q = norm.ppf((np.arange(1, r.size + 1) - 0.5) / r.size)
            ax[2].plot(q, r, ".", ms=3)
            ax[2].plot(q, q, "k-", lw=0.8)
            ax[2].set(xlabel="normal quantile", ylabel="weighted residual", title="normal Q-Q")
            fig.tight_layout()
            paths.append(_save(fig, out / f"residuals_{o}.png"))
        if "forecast" in f:
            fc = f["forecast"]
            o = next(k[: -len("_analysis")] for k in fc if k.endswith("_analysis"))
            y = f[f"observed/{o}"][:]
            lead = 30.0 if f"{o}_h30_p50" in fc else None
            name = f"{o}_h{lead:g}" if lead else None
            alerts = {k: f["alerts"][k][:] for k in f["alerts"] if not k.endswith(("_probability", "_lead"))} \
                if "alerts" in f else {}
            n = min(len(y), 6)
            fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n), squeeze=False, sharex=True)
            for i in range(n):
                ax = axes[i, 0]
                ax.plot(t, y[i], ".", ms=2, color="0.5", label="observed")
                if name:
                    ax.fill_between(t + lead, fc[f"{name}_p05"][i], fc[f"{name}_p95"][i], alpha=0.3,
                                    label=f"{lead:g}-{tu} forecast 90% interval")
                    ax.plot(t + lead, fc[f"{name}_p50"][i], lw=1, label=f"{lead:g}-{tu} forecast median")
                for k, a in alerts.items():
                    for ta in t[a[i] > 0]:
                        ax.axvline(ta, color="r", lw=0.8, alpha=0.7)
                ax.set_ylabel(f"twin {i}")
            axes[0, 0].legend(fontsize=7, loc="upper right")
            axes[-1, 0].set_xlabel(f"time [{tu}] (red: alerts)")
            fig.tight_layout()
            paths.append(_save(fig, out / f"forecasts_{o}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
