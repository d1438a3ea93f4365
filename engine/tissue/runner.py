"""`twin run` for `[tissue]` jobs: one organ split into slabs over the ranks, or (planning jobs)
one candidate intervention per rank at a time; results in RUN_DIR/RUN.h5 (xarray-readable)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from engine.errors import EXIT_INTERRUPTED, EXIT_OK, Interrupted, StoreError, TwinError
from engine.parallel import SerialComm, lor

from .analysis import conduction_velocity, reentry, total_activation_time
from .checkpoint import Checkpoints, fingerprint
from .setup import Plan, make_plan, region_mask, stimuli
from .simulate import simulate

MASTER = "RUN.h5"


def _backend(loaded, comm):
    from engine.backend import resolve

    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID",
                                                                            os.environ.get("SLURM_LOCALID", "0"))))
    be = resolve(loaded.job.job.backend, local)
    from kernels.tissue.build import tissue_kernels

    xp = np
    if be.name == "cuda":  # pragma: no cover - needs a GPU
        import cupy as xp  # noqa: F811
    return be, xp, tissue_kernels


def _sim(plan: Plan, ts, kernels, xp, comm, stims=None, geom=None, electrodes=True, points=True, progress=None,
         checkpoints=None):
    o = ts.outputs
    return simulate(geom or plan.geom, plan.model, plan.params, kernels, stims if stims is not None else plan.stimuli,
                    ts.dt, ts.end_time, ts.diffusion_substeps, comm, plan.points if points else {}, o.trace_every,
                    o.electrodes if electrodes else (), ts.conductivity.chi, ts.conductivity.cm, o.sigma_bath,
                    ts.activation_threshold, ts.repolarisation_threshold, ts.stop_after_activation, xp,
                    progress, checkpoints)


def _on_rank0(comm, fn):
    """Run fn on rank 0; a user error there is raised on every rank (no rank left waiting)."""
    err = None
    if comm.rank == 0:
        try:
            fn()
        except TwinError as e:
            err = (type(e), str(e))
    err = comm.bcast(err, root=0)
    if err:
        raise err[0](err[1])


def run_tissue(loaded, out_dir: Path, comm=None, quiet: bool = False) -> int:
    """Run (or resume from RUN_DIR/checkpoint) a tissue job on every rank of `comm`; exit code."""
    from engine.provenance import collect, utc_now
    from engine.runner import StopFlag
    from engine.store import RunLock

    comm = comm or SerialComm()
    out_dir = Path(out_dir)
    master = out_dir / MASTER
    _on_rank0(comm, lambda: _check_existing(master, loaded))
    done = comm.bcast(master.exists(), root=0)
    if done:
        if comm.rank == 0:
            # a kill between writing the result and removing the checkpoints leaves them behind
            shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
            if not quiet:
                print(f"{master}: already complete (same job); nothing to do")
        return EXIT_OK
    plan = make_plan(loaded)
    ts = loaded.job.tissue
    lock = RunLock(out_dir) if comm.rank == 0 else None
    _on_rank0(comm, lambda: lock.acquire())
    try:
        stop = StopFlag()
        stop.install()
        ck = Checkpoints(out_dir, fingerprint(loaded), ts.checkpoint_every_s, comm, stop)
        _on_rank0(comm, ck.check)
        be, xp, build = _backend(loaded, comm)
        kernels = build(plan.model, be.name, ts.lookup_tables)
        prov = collect(loaded.text, loaded.sha256, be.name, be.device, comm.size, 0)

        def progress(t, end):
            if comm.rank == 0 and not quiet:
                sys.stderr.write(f"\rtissue: t = {t:8.2f} / {end:g} ms")
                sys.stderr.flush()

        try:
            if ts.planning is None:
                res = _sim(plan, ts, kernels, xp, comm, progress=progress, checkpoints=ck)
            else:
                rows = _planning(loaded, plan, ts, kernels, xp, comm, ck, stop)
        except Interrupted:
            if comm.rank == 0:
                print(f"\ntwin: interrupted; checkpoint saved in {ck.dir}: rerun the same command to resume "
                      f"(exit {EXIT_INTERRUPTED})", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        if comm.rank == 0:
            prov["end_time"] = utc_now()
            prov["tissue_fingerprint"] = ck.fp  # same science = done, whatever [slurm] says
            if ts.planning is None:
                if not quiet:
                    sys.stderr.write("\n")
                    if ck.resumed_at is not None:
                        print(f"resumed from the checkpoint at t = {ck.resumed_at:g} ms")
                _write(master, loaded, plan, res, prov)
                if not quiet:
                    _summary(master, res, plan)
            else:
                _write_planning(master, loaded, plan, rows, prov)
                if not quiet:
                    for r in rows:
                        print(f"  #{r['rank']} {r['name']:<16} {r['kind']:<8} total activation time "
                              f"{r['total_activation_time']:.2f} ms, activated {100 * r['activated_fraction']:.1f} %, "
                              f"re-entry {'yes' if r['reentry'] else 'no'}")
        ck.clear()  # the result is written: its checkpoints are no longer needed
        comm.barrier()
        return EXIT_OK
    finally:
        if lock is not None:
            lock.release()


def _check_existing(master: Path, loaded) -> None:
    if not master.exists():
        master.parent.mkdir(parents=True, exist_ok=True)
        return
    import h5py

    try:
        with h5py.File(master, "r") as f:
            sha = f.attrs.get("job_sha256")
            fp = f.attrs.get("tissue_fingerprint")
    except OSError as e:
        raise StoreError(f"{master}: cannot read existing result ({e}); remove it or choose another output") from None
    sha = sha.decode() if isinstance(sha, bytes) else sha
    fp = fp.decode() if isinstance(fp, bytes) else fp
    if sha != loaded.sha256 and fp != fingerprint(loaded):
        raise StoreError(f"{master}: holds the result of a different job (sha256 {str(sha)[:16]}); "
                         "choose another output directory")


def _coords(plan: Plan) -> dict:
    g = plan.geom
    return {a: (a, np.arange(n) * g.dx, {"units": "mm"}) for a, n in zip("xyz", g.shape)}


def _write(master: Path, loaded, plan: Plan, res, prov: dict) -> None:
    import xarray as xr

    m = res.maps
    xyz = ("x", "y", "z")
    names = list(plan.points)
    data = {
        "mask": (xyz, plan.geom.mask.astype(np.int8), {"description": "1 = tissue"}),
        "activation_time": (xyz, m.activation, {"units": "ms", "description": "first up-crossing of the activation threshold"}),
        "last_activation_time": (xyz, m.last_activation, {"units": "ms"}),
        "repolarisation_time": (xyz, m.repolarisation, {"units": "ms"}),
        "apd": (xyz, m.apd, {"units": "ms", "description": "repolarisation - activation of the last complete AP"}),
        "n_activations": (xyz, m.n_activations.astype(np.int32), {}),
        "V": (("point", "time"), res.traces if names else np.zeros((0, len(res.trace_times))),
              {"units": "mV", "description": "membrane potential at the output points"}),
        "point_activation_time": (("point",), np.array([m.activation[plan.points[k]] for k in names]), {"units": "ms"}),
        "point_position": (("point", "axis"), np.array([[i * plan.geom.dx for i in plan.points[k]] for k in names]).reshape(-1, 3),
                           {"units": "mm"}),
    }
    el = loaded.job.tissue.outputs.electrodes
    if el:
        data["ecg"] = (("electrode", "time"), res.ecg, {"units": "mV", "description": "pseudo-ECG (infinite bath)"})
    coords = {**_coords(plan), "time": ("time", res.trace_times, {"units": "ms"}), "point": ("point", names),
              "axis": ("axis", ["x", "y", "z"]), "electrode": ("electrode", [e.name for e in el])}
    ds = xr.Dataset(data, coords=coords)
    cv = conduction_velocity(m.activation, plan.geom.mask, plan.geom.dx)
    stats = {**res.stats, "t_end": res.t_end, "dt_limit": plan.dt_limit,
             "total_activation_time": total_activation_time(m.activation, plan.geom.mask),
             "median_cv_mm_per_ms": cv,
             "max_activations": int(m.n_activations[plan.geom.mask].max()),
             "reentry": reentry(m.n_activations, plan.geom.mask, sum(s.count for s in plan.stimuli))}
    ds.attrs.update({k: v for k, v in prov.items()})
    ds.attrs.update({"kind": "tissue", "job_name": loaded.job.job.name, "stats": json.dumps(stats)})
    _save(ds, master)


def _save(ds, master: Path) -> None:
    tmp = master.with_suffix(".h5.tmp")
    ds.to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, master)


def _summary(master: Path, res, plan: Plan) -> None:
    st = res.stats
    print(f"{master}: {st['tissue_voxels']} voxels, {st['steps']} steps in {st['wall_s']:.1f} s "
          f"({st['node_updates_per_s'] / 1e6:.2f} M node-updates/s)")
    for k, ijk in plan.points.items():
        print(f"  {k:<6} activation {res.maps.activation[ijk]:.2f} ms")


# ------------------------------------------------------------------------------------ planning
def _candidate(i: int, c, plan: Plan, ts, kernels, xp) -> dict:
    """Simulate one candidate intervention on one rank; its result row."""
    from dataclasses import replace

    pl = ts.planning
    geom, stims = plan.geom, plan.stimuli
    if c.kind == "ablation":
        lesion = region_mask(c.region, geom.shape, geom.dx)
        geom = replace(geom, mask=geom.mask & ~lesion)
        stims = [replace(s, region=s.region & geom.mask) for s in stims]
        stims = [s for s in stims if s.region.any()]
    else:
        from .config import StimulusSection

        spec = StimulusSection(**c.region.model_dump(), start=pl.pulse_start, duration=pl.pulse_duration,
                               current=pl.pulse_current)
        pulse = stimuli(ts, geom, plan.model, plan.params, [spec], key=f"tissue.planning.candidates[{i}].region")
        stims = (list(stims) if pl.keep_stimuli else []) + pulse
    if not stims:
        return {"name": c.name, "kind": c.kind, "total_activation_time": np.nan, "activated_fraction": 0.0,
                "reentry": False, "max_activations": 0, "pulses": 0}
    r = _sim(plan, ts, kernels, xp, SerialComm(), stims=stims, geom=geom, electrodes=False, points=False)
    a = r.maps.activation[geom.mask]
    pulses = sum(s.count for s in stims)
    return {"name": c.name, "kind": c.kind,
            "total_activation_time": total_activation_time(r.maps.activation, geom.mask),
            "activated_fraction": float(np.mean(~np.isnan(a))),
            "max_activations": int(r.maps.n_activations[geom.mask].max()), "pulses": int(pulses),
            "reentry": reentry(r.maps.n_activations, geom.mask, pulses)}


def _planning(loaded, plan: Plan, ts, kernels, xp, comm, ck, stop) -> list[dict]:
    """Each rank simulates whole candidates (round-robin over those not finished before); each
    finished candidate is checkpointed at once; rank 0 ranks them all."""
    pl = ts.planning
    done = ck.done_candidates()
    if done and comm.rank == 0:
        print(f"resumed: {len(done)} of {len(pl.candidates)} candidates from the checkpoint", flush=True)
    todo = [i for i in range(len(pl.candidates)) if i not in done]
    mine, interrupted = [], False
    for k, i in enumerate(todo):
        if k % comm.size != comm.rank:
            continue
        if stop():
            interrupted = True
            break
        row = _candidate(i, pl.candidates[i], plan, ts, kernels, xp)
        ck.save_candidate(i, row)
        mine.append((i, row))
    if lor(comm, interrupted):
        raise Interrupted()
    allrows = comm.gather(mine, root=0)
    if comm.rank != 0:
        return []
    got = dict(done)
    got.update({i: r for part in allrows for i, r in part})
    rows = [got[i] for i in range(len(pl.candidates))]
    if pl.objective == "total_activation_time":
        key = lambda r: (r["activated_fraction"] < 1.0, r["total_activation_time"])  # noqa: E731
    else:
        key = lambda r: (not r["reentry"], r["total_activation_time"])  # noqa: E731 - inducing re-entry first
    for k, r in enumerate(sorted(rows, key=key), start=1):
        r["rank"] = k
    return sorted(rows, key=lambda r: r["rank"])


def _write_planning(master: Path, loaded, plan: Plan, rows: list[dict], prov: dict) -> None:
    import xarray as xr

    ds = xr.Dataset(
        {"kind": (("candidate",), np.array([r["kind"] for r in rows])),
         "rank": (("candidate",), np.array([r["rank"] for r in rows], np.int32)),
         "total_activation_time": (("candidate",), np.array([r["total_activation_time"] for r in rows]), {"units": "ms"}),
         "activated_fraction": (("candidate",), np.array([r["activated_fraction"] for r in rows])),
         "reentry": (("candidate",), np.array([r["reentry"] for r in rows], np.int8)),
         "max_activations": (("candidate",), np.array([r["max_activations"] for r in rows], np.int32),
                             {"description": "most activations of any tissue voxel"}),
         "pulses": (("candidate",), np.array([r["pulses"] for r in rows], np.int32),
                    {"description": "stimulus pulses the candidate's protocol delivers"})},
        coords={"candidate": ("candidate", [r["name"] for r in rows])})
    ds.attrs.update(prov)
    ds.attrs.update({"kind": "tissue_planning", "job_name": loaded.job.job.name,
                     "objective": loaded.job.tissue.planning.objective})
    _save(ds, master)
