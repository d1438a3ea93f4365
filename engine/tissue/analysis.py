"""Tissue results: conduction velocity, total activation time, and `twin report` figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def total_activation_time(act: np.ndarray, mask: np.ndarray) -> float:
    """Latest minus earliest activation over the tissue (NaN if any voxel never activated)."""
    a = act[mask]
    return float(np.max(a) - np.min(a)) if a.size and not np.isnan(a).any() else float("nan")


def reentry(n_activations: np.ndarray, mask: np.ndarray, pulses: int) -> bool:
    """Re-entry: some tissue voxel activated more often than the stimuli pulsed.

    Without re-entry every pulse starts at most one wave, and a wave crosses each voxel at most once
    (a voxel it has excited is refractory behind it; colliding waves annihilate), so a voxel's
    activation count never exceeds the number of pulses. A wave that comes back to tissue it has
    already excited (a rotor, a circuit round a lesion) adds activations without pulses."""
    n = n_activations[mask]
    return bool(n.size and int(n.max()) > int(pulses))


def conduction_velocity(act: np.ndarray, mask: np.ndarray, dx: float) -> float:
    """Median of 1/|grad t_act| (mm/ms) over tissue voxels whose 6 neighbours are all activated tissue.

    np.gradient's central differences; voxels in the stimulus (t ~ 0 everywhere) or with |grad t|
    ~ 0 are excluded by requiring |grad t| > 1e-3 ms/mm (CV < 1000 mm/ms)."""
    a = np.where(mask, act, np.nan)
    if a.ndim != 3 or min(a.shape) < 3:
        return float("nan")
    g = np.gradient(a, dx)
    speed = np.sqrt(sum(x ** 2 for x in g))
    ok = np.isfinite(speed) & (speed > 1e-3)
    return float(np.median(1.0 / speed[ok])) if ok.any() else float("nan")


def plane_wave_cv(act_line: np.ndarray, dx: float, lo: int, hi: int) -> float:
    """CV (mm/ms) from activation times along a line of nodes: least-squares slope over [lo, hi)."""
    x = np.arange(lo, hi) * dx
    slope = np.polyfit(x, act_line[lo:hi], 1)[0]
    return float(1.0 / slope)


def is_tissue_run(path) -> bool:
    import h5py

    p = Path(path)
    p = p / "RUN.h5" if p.is_dir() else p
    try:
        with h5py.File(p, "r") as f:
            k = f.attrs.get("kind")
    except OSError:
        return False
    k = k.decode() if isinstance(k, bytes) else k
    return k in ("tissue", "tissue_planning")


def summary_text(path) -> str:
    """Run statistics and the activation time at each output point (or the planning table)."""
    import xarray as xr

    p = Path(path)
    p = p / "RUN.h5" if p.is_dir() else p
    with xr.open_dataset(p, engine="h5netcdf") as ds:
        lines = [f"{ds.attrs.get('job_name', p.parent.name)} ({ds.attrs.get('kind')}, backend {ds.attrs.get('backend')}, "
                 f"{ds.attrs.get('ranks')} ranks)"]
        if ds.attrs.get("kind") == "tissue_planning":
            for c in ds["candidate"].values:
                r = ds.sel(candidate=c)
                lines.append(f"  #{int(r['rank'])} {c}: {r['kind'].item()}, total activation time "
                             f"{float(r['total_activation_time']):.2f} ms, activated "
                             f"{100 * float(r['activated_fraction']):.1f} %, re-entry {bool(r['reentry'])}")
            return "\n".join(lines)
        st = json.loads(ds.attrs.get("stats", "{}"))
        lines.append(f"  {st.get('tissue_voxels')} voxels, {st.get('steps')} steps to t = {st.get('t_end')} ms, "
                     f"{st.get('node_updates_per_s', float('nan')) / 1e6:.2f} M node-updates/s; total activation "
                     f"time {st.get('total_activation_time', float('nan')):.2f} ms")
        for k, v in zip(ds["point"].values, ds["point_activation_time"].values):
            lines.append(f"  {k}: activation {v:.3f} ms")
    return "\n".join(lines)


def report(path, out_dir) -> list[Path]:
    """PNGs: activation map (three mid-slices), APD map, V traces at the points, pseudo-ECG leads;
    for planning runs, the candidates' total activation times."""
    import xarray as xr
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = Path(path)
    p = p / "RUN.h5" if p.is_dir() else p
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = xr.open_dataset(p, engine="h5netcdf")
    paths = []
    try:
        name = str(ds.attrs.get("job_name", p.parent.name))
        if ds.attrs.get("kind") == "tissue_planning":
            fig = Figure(figsize=(7, 0.5 + 0.4 * ds.sizes["candidate"]))
            ax = fig.add_subplot()
            tat = ds["total_activation_time"].values
            ax.barh(list(ds["candidate"].values), tat, color=["C3" if r else "C0" for r in ds["reentry"].values])
            ax.invert_yaxis()
            ax.set_xlabel("total activation time (ms); red: re-entry")
            ax.set_title(f"{name}: candidates")
            fig.tight_layout()
            q = out / "candidates.png"
            FigureCanvasAgg(fig).print_png(q)
            return [q]
        for var, label in (("activation_time", "activation time (ms)"), ("apd", "APD (ms)")):
            a = ds[var].values
            if np.all(np.isnan(a)):
                continue
            fig = Figure(figsize=(12, 3.6))
            nx, ny, nz = a.shape
            sl = [("z", a[:, :, nz // 2].T, "x (mm)", "y (mm)"), ("y", a[:, ny // 2, :].T, "x (mm)", "z (mm)"),
                  ("x", a[nx // 2, :, :].T, "y (mm)", "z (mm)")]
            dx = float(ds["x"].values[1] - ds["x"].values[0]) if nx > 1 else 1.0
            vmin, vmax = np.nanmin(a), np.nanmax(a)
            for i, (ax_name, img, xl, yl) in enumerate(sl):
                ax = fig.add_subplot(1, 3, i + 1)
                im = ax.imshow(img, origin="lower", extent=[0, (img.shape[1] - 1) * dx, 0, (img.shape[0] - 1) * dx],
                               vmin=vmin, vmax=vmax, cmap="viridis", aspect="equal")
                ax.set_xlabel(xl)
                ax.set_ylabel(yl)
                ax.set_title(f"mid-{ax_name} slice")
            fig.colorbar(im, ax=fig.axes, label=label)
            fig.suptitle(f"{name}: {label}")
            q = out / f"{var}_map.png"
            FigureCanvasAgg(fig).print_png(q)
            paths.append(q)
        for var, label in (("V", "V (mV)"), ("ecg", "pseudo-ECG (mV)")):
            if var not in ds or ds[var].size == 0:
                continue
            fig = Figure(figsize=(8, 4))
            ax = fig.add_subplot()
            dim = ds[var].dims[0]
            for k in ds[dim].values:
                ax.plot(ds["time"].values, ds[var].sel({dim: k}).values, label=str(k))
            ax.set_xlabel("time (ms)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7, ncol=3)
            ax.set_title(f"{name}: {label}")
            fig.tight_layout()
            q = out / f"{var}_traces.png"
            FigureCanvasAgg(fig).print_png(q)
            paths.append(q)
        st = json.loads(ds.attrs.get("stats", "{}"))
        (out / "stats.json").write_text(json.dumps(st, indent=1))
    finally:
        ds.close()
    return paths
