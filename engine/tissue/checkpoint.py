"""Checkpoints of tissue runs, so that a killed `twin run` resumes and loses nothing.

    RUN_DIR/checkpoint/state.h5              one simulation: the full state at a step boundary
    RUN_DIR/checkpoint/candidates/NNNN.json  planning jobs: each finished candidate's result row

state.h5 holds the global grid (gathered from every rank's slab, so any rank count can resume it):
every cell state including V, the previous potential and the tracking maps, the number of steps
done, and the traces / pseudo-ECG sampled so far (already combined over ranks exactly as the end of
the run combines them). Restoring these and continuing gives the same arithmetic as never stopping,
so the result equals an uninterrupted run bit for bit. Files are written to a temporary name,
fsync'ed and renamed (a kill leaves the previous checkpoint or the new one, never half of one).

A checkpoint belongs to one job: its fingerprint (the validated job without [slurm] and without
`tissue.checkpoint_every_s`, which changes when checkpoints are taken, not what they hold, plus the
contents of the cell model / geometry / fibre files) must match, else the run refuses to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from engine.errors import StoreError

DIR = "checkpoint"
STATE = "state.h5"
FORMAT = "twin-tissue-checkpoint/1"


def fingerprint(loaded) -> str:
    """The job's science: its validated keys and the bytes of the files they name (an edited cell
    model or geometry image under the same name is another job)."""
    science = loaded.job.model_dump(mode="json", exclude={"slurm": True, "tissue": {"checkpoint_every_s"}})
    ts = loaded.job.tissue
    files = {}
    for key, name in (("cell", ts.cell.file), ("geometry", ts.geometry.file), ("fibres", ts.fibres.file)):
        p = loaded.resolve(name) if name else None
        if p is not None and p.is_file():
            files[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    science["_files"] = files
    return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _attr(v):
    return v.decode() if isinstance(v, bytes) else v


class Checkpoints:
    """Checkpointing of one run directory; every method is called on every rank (collectives)."""

    def __init__(self, run_dir: Path, fp: str, every_s: float, comm, stop=None):
        self.dir = Path(run_dir) / DIR
        self.fp, self.every_s, self.comm = fp, float(every_s), comm
        self.stop = stop or (lambda: False)
        self.last = time.monotonic()
        self.stopping = False
        self.resumed_at: float | None = None  # simulated ms of the state a run resumed from

    # ------------------------------------------------------------------ ownership
    def check(self) -> None:
        """Rank 0: refuse checkpoints written by another job (StoreError naming the file)."""
        if self.comm.rank != 0:
            return
        files = [self.dir / STATE] if (self.dir / STATE).exists() else []
        files += sorted((self.dir / "candidates").glob("*.json")) if (self.dir / "candidates").is_dir() else []
        for f in files:
            try:
                if f.suffix == ".h5":
                    import h5py

                    with h5py.File(f, "r") as h:
                        fp = _attr(h.attrs.get("job_fingerprint"))
                else:
                    fp = json.loads(f.read_text()).get("job_fingerprint")
            except (OSError, ValueError) as e:
                raise StoreError(f"{f}: unreadable checkpoint ({e}); remove it to start over") from None
            if fp != self.fp:
                raise StoreError(f"{f}: checkpoint of a different job (fingerprint {str(fp)[:16]}, this job "
                                 f"{self.fp[:16]}); use another output directory or remove {self.dir}")

    def clear(self) -> None:
        """Rank 0, after the result is written: the checkpoints are no longer needed."""
        if self.comm.rank == 0 and self.dir.exists():
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ one simulation
    def due(self) -> bool:
        """Collective: time for a checkpoint (interval elapsed on rank 0, or a stop signal on any rank)."""
        from engine.parallel import lor

        self.stopping = lor(self.comm, self.stop())
        now = time.monotonic() - self.last >= self.every_s if self.comm.rank == 0 else None
        return self.stopping or bool(self.comm.bcast(now, root=0))

    def save(self, solver, times, tr, ecg, all_act_at) -> None:
        from .simulate import combine

        arrays = {"Y": [solver.gather(solver.Y[i]) for i in range(solver.Y.shape[0])]}
        for k in ("Vprev", "act1", "act2", "rep", "apd", "nact"):
            arrays[k] = solver.gather(getattr(solver, k))
        traces, e_sum = combine(self.comm, tr, ecg, len(times))
        if self.comm.rank == 0:
            import h5py

            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{STATE}.{os.getpid()}.tmp"
            with h5py.File(tmp, "w") as h:
                h.attrs.update({"format": FORMAT, "job_fingerprint": self.fp, "steps": solver.steps,
                                "all_act_at": np.nan if all_act_at is None else all_act_at})
                h["Y"] = np.stack(arrays["Y"])
                for k in ("Vprev", "act1", "act2", "rep", "apd", "nact"):
                    h[k] = arrays[k]
                h["times"] = np.asarray(times, float)
                h["traces"] = traces
                h["ecg"] = np.zeros((0, len(times))) if e_sum is None else e_sum
            _commit(tmp, self.dir / STATE)
        self.comm.barrier()
        self.last = time.monotonic()

    def load(self, solver):
        """Restore the solver from state.h5 if there is one: returns (times, tr, ecg, all_act_at) as
        this rank's lists (rank 0 holds the combined history; other ranks NaN traces and zero ECG,
        which the final combination leaves unchanged), or None to start from t = 0."""
        path = self.dir / STATE
        if not self.comm.bcast(path.exists() if self.comm.rank == 0 else None, root=0):
            return None
        try:
            return self._load(solver, path)
        except (OSError, KeyError, ValueError) as e:  # damaged after check(): say which file, not a traceback
            raise StoreError(f"{path}: unreadable checkpoint ({e}); remove it to start over") from None

    def _load(self, solver, path: Path):
        import h5py

        with h5py.File(path, "r") as h:
            steps = int(h.attrs["steps"])
            aa = float(h.attrs["all_act_at"])
            x0, x1 = solver.x0, solver.x1
            lo, hi = max(x0 - 1, 0), min(x1 + 1, solver.geom.shape[0])

            def put(dest, glob):  # this rank's slab and its interior ghost planes
                host = dest if solver.xp is np else solver.xp.asnumpy(dest)
                full = np.asarray(host).reshape(solver.shape).copy()
                full[lo - (x0 - 1):hi - (x0 - 1), 1:-1, 1:-1] = glob[lo:hi]
                dest[...] = solver.xp.asarray(full.reshape(-1))

            Y = h["Y"]
            for i in range(solver.Y.shape[0]):
                put(solver.Y[i], Y[i])
            for k in ("Vprev", "act1", "act2", "rep", "apd", "nact"):
                put(getattr(solver, k), h[k][()])
            times = h["times"][()].tolist()
            traces, e = h["traces"][()], h["ecg"][()]
        solver.steps = steps
        solver.t = steps * solver.dt
        self.resumed_at = solver.t
        T = len(times)
        if self.comm.rank == 0:
            tr = [list(traces[:, j]) for j in range(T)]
            ecg = [e[:, j].copy() for j in range(T)] if e.shape[0] else []
        else:
            tr = [[np.nan] * traces.shape[0] for _ in range(T)]
            ecg = [np.zeros(e.shape[0]) for _ in range(T)] if e.shape[0] else []
        return times, tr, ecg, (None if np.isnan(aa) else aa)

    # ------------------------------------------------------------------ planning candidates
    def done_candidates(self) -> dict[int, dict]:
        """Finished candidates' rows by index (all ranks get the same dict)."""
        rows = None
        if self.comm.rank == 0:
            rows = {}
            d = self.dir / "candidates"
            for f in sorted(d.glob("*.json")) if d.is_dir() else []:
                rec = json.loads(f.read_text())
                rows[int(rec["index"])] = rec["row"]
        return self.comm.bcast(rows, root=0)

    def save_candidate(self, index: int, row: dict) -> None:
        """Any rank, for its own candidate (one file each: no coordination needed)."""
        d = self.dir / "candidates"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{index:04d}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"job_fingerprint": self.fp, "index": index, "row": row}))
        _commit(tmp, d / f"{index:04d}.json")
