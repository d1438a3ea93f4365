"""Run a job: cohort chunks → kernel → per-rank shards → master RUN.h5.

Every rank builds the same plan; rank 0 owns the run directory (manifest, attempt number,
resume check, audit records, master file); chunks are handed out by `engine.parallel.ChunkQueue`.
A chunk's numbers depend only on the chunk (patients, their random streams, the kernel), so any
number of ranks, any chunk order and any resume give bit-identical arrays.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.compile import ode_kernel
from kernels.ode.integrate_numpy import SolverOptions

from . import biomarkers as bm
from . import provenance, store
from .backend import Backend, resolve
from .cohort import CohortSource, open_cohort
from .config import LoadedJob
from .dosing import build_events
from .errors import EXIT_INTERRUPTED, EXIT_OK, Interrupted, StoreError, TwinError
from .layout import STATUS_CODES, Layout, VarSpec, status_attrs
from .models import EVENT_HOOKS, job_model
from .parallel import ChunkQueue, abort, lor

log = logging.getLogger("twin")

# After a termination signal, a chunk still running this long is dropped (it is recomputed on
# resume); shorter ones are finished. Keeps exit well inside Slurm's usual 30 s grace period.
DROP_AFTER_S = 10.0


class StopFlag:
    """Set by SIGTERM/SIGINT; polled between chunks and inside the kernel's time loop."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self) -> bool:
        return self.at is not None

    def handler(self, signum, frame):  # noqa: ARG002
        if self.at is None:
            self.at = time.monotonic()

    def check(self) -> None:
        if self.at is not None and time.monotonic() - self.at > DROP_AFTER_S:
            raise Interrupted()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handler)
        signal.signal(signal.SIGINT, self.handler)


@dataclass
class Plan:
    loaded: LoadedJob
    cohort: CohortSource
    layout: Layout
    backend: Backend
    typical: dict[str, float]
    assignment: np.ndarray | None = None  # stratified randomisation: arm of every patient

    @property
    def job(self):
        return self.loaded.job


def build_layout(loaded: LoadedJob, cohort: CohortSource) -> Layout:
    job = loaded.job
    if job.pacing is not None:
        from . import cell_screen

        return cell_screen.build_layout(loaded, cohort)
    model = job_model(loaded)
    times = job.outputs.time_values()
    tu = model.time_unit
    v: list[VarSpec] = []
    ctl = _controller_class(job)
    for name in job.outputs.variables:
        if ctl is not None and name in ctl.signals:
            sg = ctl.signals[name]
            v.append(VarSpec(name, ("patient", "time"), "f8", {"units": sg.unit, "long_name": sg.long_name}))
            continue
        desc = next((o.description for o in model.outputs if o.name == name), "")
        desc = desc or next((s.description for s in model.states if s.name == name), "")
        v.append(VarSpec(name, ("patient", "time"), "f8", {"units": model.unit_of(name), "long_name": desc}))
    v.append(VarSpec("status", ("patient",), "i1", status_attrs()))
    screened = job.trial is not None and (job.trial.inclusion or job.trial.exclusion or job.trial.randomisation != "simple")
    v.append(VarSpec("arm", ("patient",), "i2", {
        "flag_values": np.arange(-1 if screened else 0, len(job.arms), dtype="i2"),
        "flag_meanings": " ".join((["not_randomised"] if screened else []) + [a.name for a in job.arms]),
        "long_name": "treatment arm",
    }))
    for name in sorted(set(cohort.covariate_units) | set(cohort.categories)):
        if name in cohort.categories:
            cats = cohort.categories[name]
            v.append(VarSpec(f"cohort/{name}", ("patient",), "i2", {
                "flag_values": np.arange(len(cats), dtype="i2"), "flag_meanings": " ".join(cats),
                "kind": "covariate", "long_name": f"covariate {name}"}))
        else:
            v.append(VarSpec(f"cohort/{name}", ("patient",), "f8", {
                "units": cohort.covariate_units.get(name, ""), "kind": "covariate", "long_name": f"covariate {name}"}))
    for p in model.parameters:
        v.append(VarSpec(f"cohort/{p.name}", ("patient",), "f8", {
            "units": p.unit, "kind": "parameter", "long_name": p.description}))
    if job.cohort.csv is not None or job.cohort.calibrated is not None:
        v.append(VarSpec("cohort/pseudonym", ("patient",), "S64", {
            "long_name": "HMAC-SHA256 pseudonym of the source identifier"}))
    if ctl is not None:
        for name, sg in ctl.results.items():
            v.append(VarSpec(f"biomarkers/{name}", ("patient",), "f8", {"units": sg.unit, "long_name": sg.long_name}))
    for b in job.outputs.biomarkers:
        v.append(VarSpec(f"biomarkers/{b.name}", ("patient",), "f8", {
            "units": bm.units(b.statistic, model.unit_of(b.variable), tu),
            "long_name": f"{b.statistic} of {b.variable}" + (f" above {b.threshold}" if b.threshold is not None else ""),
        }))
    return Layout(cohort.n, times, tu, v, job.job.chunk_size)


def _controller_class(job):
    if job.controller is None:
        return None
    from .controllers import get_controller

    return get_controller(job.controller.name)


def make_plan(loaded: LoadedJob, local_rank: int = 0) -> Plan:
    job = loaded.job
    model = job_model(loaded)
    typical = {**model.defaults(), **job.model.parameters}
    cohort = open_cohort(loaded, typical, positive=[p.name for p in model.parameters if p.positive])
    overlap = set(cohort.covariate_units) & set(model.parameter_names)
    if overlap:
        raise TwinError(f"{loaded.path}: covariate names {sorted(overlap)} clash with parameters of {model.name}; rename the covariates")
    backend = resolve(job.job.backend, local_rank)
    if job.solver.precision == "float32" and backend.name == "numpy":
        raise TwinError(f"{loaded.path}: key 'solver.precision' = 'float32': backend 'numpy' runs in float64 only; "
                        "use backend 'cpu', 'cuda' or 'auto'")
    assignment = None
    if job.trial is not None and job.trial.randomisation == "stratified":
        from .trial import stratified_assignment

        assignment = stratified_assignment(job, cohort)
    return Plan(loaded, cohort, build_layout(loaded, cohort), backend, typical, assignment)


def solver_options(job, model) -> SolverOptions:
    """The job's [solver] as kernel options (per-state atol resolved in the model's state order)."""
    s = job.solver
    atol = (np.array([s.atol.get(n, s.atol.get("default", 1e-10)) for n in model.state_names])
            if isinstance(s.atol, dict) else s.atol)
    return SolverOptions(method=s.method, rtol=s.rtol, atol=atol, max_steps=s.max_steps, dt=s.dt,
                         first_step=s.first_step)


def compute_chunk(plan: Plan, chunk_id: int, check=None) -> dict[str, np.ndarray]:
    """All arrays of one chunk, keyed by layout path."""
    job, layout = plan.job, plan.layout
    if job.pacing is not None:
        from . import cell_screen

        return cell_screen.compute_chunk(plan, chunk_id, check)
    model = job_model(plan.loaded)
    start, stop = layout.chunk_bounds(chunk_id)
    ch = plan.cohort.chunk(start, stop)
    m = stop - start
    P = np.array([ch.parameters[n] for n in model.parameter_names], dtype=float).reshape(len(model.parameters), m)
    status = ch.status.astype(np.int8).copy()
    arm = ch.arm.astype(np.int16).copy()
    if job.trial is not None:
        from .trial import NOT_RANDOMISED, screen

        inc = screen(job.trial, ch.covariates, plan.cohort.categories)
        if plan.assignment is not None:
            arm = plan.assignment[start:stop].copy()
            inc &= arm != NOT_RANDOMISED
        status[(status == 0) & ~inc] = STATUS_CODES["excluded"]
        arm[~inc] = NOT_RANDOMISED
    must_pos = np.array([p.positive for p in model.parameters])
    bad = ~np.all(np.isfinite(P), axis=0) | np.any((P <= 0) & must_pos[:, None], axis=0)
    status[(status == 0) & bad] = STATUS_CODES["invalid_parameter"]
    # failed patients still go through the kernel with harmless values, so chunk shapes never change
    P_run = np.where(status == 0, P, np.array([p.default for p in model.parameters])[:, None])
    events = build_events(model, job.arms, np.maximum(arm, 0), P_run)  # not-randomised patients are not run
    hook = EVENT_HOOKS.get(model.name)
    if hook is not None:  # events a model needs besides doses (circ_0d: one per heart beat)
        events = hook(model, P_run, events, float(layout.time[-1]))
    opts = solver_options(job, model)
    kernel = ode_kernel(model, plan.backend.name, job.solver.precision)
    arrays: dict[str, np.ndarray] = {}
    ctl_cls = _controller_class(job)
    if ctl_cls is None:
        samples, status = kernel.run(P_run, events, layout.time, opts, job.outputs.variables, status, check)
        for i, name in enumerate(job.outputs.variables):
            arrays[name] = np.ascontiguousarray(samples[i])
    else:
        from .controllers import ChunkContext
        from .segments import run_controlled

        ctx = ChunkContext(model=model, P=P_run, covariates=ch.covariates, index=ch.index, arm=arm,
                           seed=job.job.seed, t_end=float(layout.time[-1]))
        ctl = ctl_cls(plan.loaded._controller_settings, job.controller.period, ctx)
        rec = [v for v in job.outputs.variables if v not in ctl_cls.signals]
        samples, status, sig = run_controlled(kernel, ctl, P_run, events, layout.time, opts, rec, status, check)
        for name in job.outputs.variables:
            arrays[name] = np.ascontiguousarray(sig[name] if name in ctl_cls.signals else samples[rec.index(name)])
        for name, val in ctl.result_values().items():
            r = np.asarray(val, float).copy()
            r[status != 0] = np.nan
            arrays[f"biomarkers/{name}"] = r
    arrays["status"] = status
    arrays["arm"] = arm
    for spec in layout.vars:
        if spec.path.startswith("cohort/"):
            key = spec.path[7:]
            if key == "pseudonym":
                arrays[spec.path] = ch.pseudonym.astype("S64")
            elif key in ch.covariates:
                arrays[spec.path] = ch.covariates[key].astype(spec.dtype)
            else:
                arrays[spec.path] = P[model.parameter_names.index(key)].astype(float)
    for b in job.outputs.biomarkers:
        y = arrays[b.variable]
        arrays[f"biomarkers/{b.name}"] = bm.compute(b.statistic, y, layout.time, b.threshold)
    return arrays


def manifest(plan: Plan) -> dict:
    lay = plan.layout
    return {
        "format": "twin-run/1",
        "job_name": plan.job.job.name,
        "job_fingerprint": plan.loaded.fingerprint,
        "cohort_fingerprint": plan.cohort.fingerprint(),
        "n_patients": lay.n_patients,
        "chunk_size": lay.chunk_size,
        "n_times": int(len(lay.time)),
        "vars": [[v.path, list(v.dims), v.dtype] for v in lay.vars],
    }


def _setup_rank_log(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(run_dir / "logs" / f"rank{rank:04d}.log")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)
    log.info("rank %d pid %d host %s", rank, os.getpid(), os.uname().nodename)


def local_rank_of(comm) -> int:
    return int(os.environ.get("MPI_LOCALRANKID", os.environ.get("SLURM_LOCALID", comm.rank)))


def plan_on_every_rank(comm, make):
    """`make()` on every rank. A user error (TwinError) is reported once, by the first rank that
    has one, and raised on every rank; any other exception aborts the whole job (a bug on one rank
    must not leave the others waiting)."""
    err = plan = None
    try:
        plan = make()
    except TwinError as e:
        err = e
    except Exception:  # noqa: BLE001
        if comm.size > 1:
            import traceback

            abort(comm, "failed while planning:\n" + traceback.format_exc())
        raise
    errs = comm.gather(None if err is None else str(err), root=0) if comm.size > 1 else [None if err is None else str(err)]
    first = comm.bcast(next((e for e in (errs or []) if e), None), root=0)
    if first:
        raise err if err is not None else TwinError(first)
    return plan


@contextmanager
def open_attempt(run_dir: Path, comm, loaded, layout: Layout, manifest, backend, seed: int,
                 record: dict | None = None, on_open=None):
    """Rank 0 takes the run lock, creates or checks the run directory against `manifest()`, finds
    the committed chunks and appends the attempt's start record (`record` adds or overrides
    fields; `on_open()` runs after it); every rank gets (attempt, done, provenance). The lock is
    released when the block ends, however it ends."""
    info = None
    lock = store.RunLock(run_dir) if comm.rank == 0 else None
    if comm.rank == 0:
        try:
            lock.acquire()
            attempt = store.init_run_dir(run_dir, manifest())
            done = store.done_chunks(run_dir, layout)
            prov = provenance.collect(loaded.text, loaded.sha256, backend.name, backend.device, comm.size, seed)
            provenance.append_record(run_dir, {"event": "start", "attempt": attempt, "job_sha256": loaded.sha256,
                                               "ranks": comm.size, "backend": backend.name,
                                               "host": prov.get("host"), "time": prov.get("start_time"),
                                               **(record or {})})
            if on_open is not None:
                on_open()
            info = (attempt, done, prov, None)
        except TwinError as e:
            info = (None, None, None, str(e))
        except Exception:  # noqa: BLE001
            if comm.size > 1:
                import traceback

                abort(comm, "failed while opening the run directory:\n" + traceback.format_exc())
            raise
    attempt, done, prov, err0 = comm.bcast(info, root=0)
    try:
        if err0:
            raise StoreError(err0)
        yield attempt, done, prov
    finally:
        if lock is not None:
            lock.release()


def run(loaded: LoadedJob, run_dir: Path, comm, quiet: bool = False) -> int:
    """Run (or resume) a job on every rank of `comm`. Returns the process exit code."""
    stop = StopFlag()
    stop.install()
    plan = plan_on_every_rank(comm, lambda: make_plan(loaded, local_rank_of(comm)))
    with open_attempt(run_dir, comm, loaded, plan.layout, lambda: manifest(plan), plan.backend,
                      plan.job.job.seed) as (attempt, done, prov):
        return _run_chunks(plan, loaded, run_dir, comm, quiet, stop, attempt, done, prov)


def process_chunks(lay: Layout, compute, run_dir: Path, comm, stop, attempt: int, done: dict, on_done=None):
    """This rank's share of the chunk queue: compute each chunk, write it to the rank's shard and
    journal. A failing rank aborts the communicator. Returns (every chunk's journal entry, the
    resumed ones included, on rank 0 / None elsewhere; whether any rank was interrupted; patients
    computed by all ranks in this attempt)."""
    rank, size = comm.rank, comm.size
    todo = [c for c in range(lay.n_chunks()) if c not in done]
    queue = ChunkQueue(comm, todo, on_done=on_done, should_stop=stop)
    writer = None
    entries: dict[int, dict] = {}
    interrupted = False
    n_new = 0
    try:
        for cid in queue:
            if interrupted:
                continue
            try:
                arrays = compute(cid)
            except Interrupted:
                log.warning("chunk %d dropped on termination signal", cid)
                interrupted = True
                queue.leave()
                continue
            if writer is None:
                writer = store.ShardWriter(run_dir, attempt, rank, lay)
            entries[cid] = writer.write_chunk(cid, arrays)
            s, e = lay.chunk_bounds(cid)
            n_new += e - s
            log.info("chunk %d done (%d patients, %d failed)", cid, e - s, entries[cid].get("n_failed", 0))
            queue.done(cid, e - s)
            if stop():
                interrupted = True
                queue.leave()
    except Exception as e:  # noqa: BLE001 - anything here is fatal for the whole job
        import traceback

        log.error("rank failed: %s", traceback.format_exc())
        abort(comm, f"failed: {e!r} (see {run_dir}/logs/rank{rank:04d}.log)")
    finally:
        if writer is not None:
            writer.close()  # commits the last group: entries get their sha256
    queue.close()
    interrupted = lor(comm, interrupted or stop())
    gathered = comm.gather((entries, n_new), root=0) if size > 1 else [(entries, n_new)]
    if rank != 0:
        return None, interrupted, n_new
    all_entries = dict(done)
    for g, _ in gathered:
        for k, v in g.items():
            all_entries.setdefault(k, v)
    return all_entries, interrupted, sum(n for _, n in gathered)


def _run_chunks(plan, loaded, run_dir, comm, quiet, stop, attempt, done, prov) -> int:
    rank, size = comm.rank, comm.size
    lay = plan.layout
    _setup_rank_log(run_dir, rank)
    todo = [c for c in range(lay.n_chunks()) if c not in done]
    log.info("attempt %d: %d chunks, %d already done, %d to run on %d ranks", attempt, lay.n_chunks(), len(done), len(todo), size)

    progress = _Progress(rank == 0 and not quiet, lay, len(done), size)
    t0 = time.time()
    all_entries, interrupted, _ = process_chunks(lay, lambda cid: compute_chunk(plan, cid, check=stop.check), run_dir,
                                                 comm, stop, attempt, done, on_done=progress.update if rank == 0 else None)
    progress.close()
    code = EXIT_INTERRUPTED if interrupted else EXIT_OK
    if rank == 0:
        elapsed = time.time() - t0
        n_new = progress.patients  # counted on rank 0 from every rank's finished chunks
        if interrupted or len(all_entries) < lay.n_chunks():
            provenance.append_record(run_dir, {"event": "interrupted", "attempt": attempt,
                                               "chunks_done": len(all_entries), "time": _now()})
            _say(quiet, f"twin: interrupted: {len(all_entries)}/{lay.n_chunks()} chunks saved in {run_dir}; "
                        f"rerun the same command to resume (exit {EXIT_INTERRUPTED})")
            code = EXIT_INTERRUPTED
        else:
            digest = provenance.result_digest(all_entries)
            head = provenance.append_record(run_dir, {"event": "complete", "attempt": attempt,
                                                      "chunks_done": len(all_entries), "result_sha256": digest,
                                                      "time": _now()})
            n_failed = int(sum(e.get("n_failed", 0) for e in all_entries.values()))
            attrs = {
                **prov,
                "job_toml": loaded.text,
                "job_sha256": loaded.sha256,
                "job_name": plan.job.job.name,
                "model": plan.job.model.name,
                "backend": plan.backend.name,
                "device": plan.backend.device,
                "ranks": size,
                "seed": plan.job.job.seed,
                "attempt": attempt,
                "end_time": _now(),
                "n_patients": lay.n_patients,
                "n_failed": n_failed,
                "n_excluded_no_consent": plan.cohort.n_excluded_no_consent,
                "result_sha256": digest,
                "audit_head": head,
            }
            path = store.build_master(run_dir, lay, all_entries, attrs)
            rate = f", {n_new / elapsed:,.0f} patients/s" if n_new else ""
            screened = ""
            if plan.job.trial is not None:
                import h5py

                with h5py.File(path, "r") as f:
                    n_out = int((f["status"][:] == STATUS_CODES["excluded"]).sum())
                n_failed -= n_out
                screened = f", {n_out} screened out"
            _say(quiet, f"twin: wrote {path} ({lay.n_patients} patients, {n_failed} failed{screened}, "
                        f"{plan.cohort.n_excluded_no_consent} excluded without consent; {elapsed:.1f} s{rate})")
    code = comm.bcast(code, root=0)
    return code


def _now() -> str:
    return provenance.utc_now()


def _say(quiet: bool, msg: str) -> None:
    print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)


class _Progress:
    """Rank-0 progress over chunks done on all ranks, patients/s and ETA (rich), or nothing."""

    def __init__(self, enabled: bool, layout: Layout, already: int, ranks: int):
        self.enabled = enabled and layout.n_chunks() > already
        self.t0 = time.monotonic()
        self.patients = 0
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(f"[bold]chunks ({ranks} rank{'s' if ranks > 1 else ''})"), BarColumn(),
                          MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                          transient=False)
        self.task = self.p.add_task("run", total=layout.n_chunks(), completed=already, rate="")
        self.p.start()

    def update(self, rank: int, chunk: int, n: int) -> None:  # noqa: ARG002
        self.patients += n
        if self.enabled:
            rate = self.patients / max(time.monotonic() - self.t0, 1e-9)
            self.p.update(self.task, advance=1, rate=f"{rate:,.0f} patients/s")

    def close(self) -> None:
        if self.enabled:
            self.p.stop()
