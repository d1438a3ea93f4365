"""`twin calibrate JOB.toml`: calibrate every patient's twin, chunk by chunk over MPI ranks.

Same machinery as `twin run` (engine.runner): patients are cut into chunks of `job.chunk_size`
fixed by the job, chunks go to ranks through `engine.runner.process_chunks` (the run's chunk queue), each rank writes its
own HDF5 shard and journal (`engine.store`), a rerun resumes, rank 0 stitches RUN.h5 and appends
to the audit chain (`engine.provenance`). A chunk's fit depends only on the chunk (its patients,
the global observation time grid, the prior), and the optional population fit sums per-chunk
statistics in chunk order, so results are bit-identical for any number of ranks.

RUN.h5 of a calibration (patient = imported patient with consent and >= 1 record):
    /<output>, /observed/<output>, /residuals/<output>  (patient, time) prediction at the MAP
                                   estimate, the observation (NaN where none), weighted residual
    /status                        fit flags (engine.calibrate.map_fit.FIT_STATUS)
    /cohort/<parameter>            every model parameter: MAP estimate or fixed value (a later
                                   `twin run` can use the twins as its cohort)
    /cohort/pseudonym              keyed hash of the source identifier
    /calibration/<p>_sd_log, /calibration/cov/<a>__<b>, objective, chi2, n_obs, iterations
    root attrs: provenance + observations sha256, prior, population estimates, import issue count
RUN_DIR/import_issues.csv lists every rejected record (record, field, message; no identifiers).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from kernels.ode.integrate_numpy import SolverOptions

from .. import provenance, store
from ..backend import resolve
from ..errors import EXIT_INTERRUPTED, EXIT_OK, CohortError, TwinError
from ..layout import Layout, VarSpec
from ..models import job_model
from ..observations import Observations, import_observations
from ..runner import StopFlag, _say, _setup_rank_log, local_rank_of, open_attempt, plan_on_every_rank, process_chunks
from .job import LoadedCalibration
from .map_fit import FIT_NAMES, FIT_STATUS, FitProblem, map_fit
from .population import population_fit_chunks
from .problem import build_problem, observation_grid

log = logging.getLogger("twin")
KIND = "calibration"


class CalibrationPlan:
    def __init__(self, loaded: LoadedCalibration, local_rank: int = 0):
        self.loaded = loaded
        job = loaded.job
        self.model = job_model(loaded)
        self.backend = resolve(job.job.backend, local_rank)
        self.obs: Observations = import_observations(loaded, job.observations)
        if not self.obs.patients:
            raise CohortError(f"{loaded.path}: no patient with consent has an importable record "
                              f"({self.obs.n_records} records, {len(self.obs.issues)} rejected)")
        c = job.calibration
        self.params = list(c.parameters)
        self.outputs = list(job.observations.variables)
        self.grid, _ = observation_grid(self.obs.patients, self.outputs)
        self.mu, self.omega = c.mu(), np.asarray(c.omega, float)
        self.err_add = np.array([c.error[o].additive for o in self.outputs])
        self.err_prop = np.array([c.error[o].proportional for o in self.outputs])
        self.err_tau = np.array([c.error[o].correlation_time for o in self.outputs])
        self.layout = self._layout()
        self.population: dict | None = None

    @property
    def job(self):
        return self.loaded.job

    def _layout(self) -> Layout:
        m = self.model
        v: list[VarSpec] = []
        for o in self.outputs:
            u = m.unit_of(o)
            v.append(VarSpec(o, ("patient", "time"), "f8", {"units": u, "long_name": f"{o} predicted at the MAP estimate"}))
            v.append(VarSpec(f"observed/{o}", ("patient", "time"), "f8", {"units": u, "long_name": f"observed {o}"}))
            v.append(VarSpec(f"residuals/{o}", ("patient", "time"), "f8", {
                "units": "1", "long_name": f"weighted residual (observed - predicted) / sd of {o}"}))
        codes = sorted(FIT_STATUS.items(), key=lambda kv: kv[1])
        v.append(VarSpec("status", ("patient",), "i1", {
            "flag_values": np.array([c for _, c in codes], "i1"), "flag_meanings": " ".join(k for k, _ in codes),
            "long_name": "per-patient calibration status"}))
        v.append(VarSpec("arm", ("patient",), "i2", {"flag_values": np.array([0], "i2"), "flag_meanings": "calibrated",
                                                     "long_name": "treatment arm"}))
        for p in m.parameters:
            est = p.name in self.params
            v.append(VarSpec(f"cohort/{p.name}", ("patient",), "f8", {
                "units": p.unit, "kind": "parameter", "estimated": int(est),
                "long_name": (f"MAP estimate of {p.description}" if est else f"{p.description} (fixed)")}))
        v.append(VarSpec("cohort/pseudonym", ("patient",), "S64", {"long_name": "HMAC-SHA256 pseudonym of the source identifier"}))
        for p in self.params:
            v.append(VarSpec(f"calibration/{p}_sd_log", ("patient",), "f8", {
                "units": "1", "long_name": f"posterior sd of log {p} (Laplace)"}))
        for i, a in enumerate(self.params):
            for b in self.params[i:]:
                v.append(VarSpec(f"calibration/cov/{a}__{b}", ("patient",), "f8", {
                    "units": "1", "long_name": f"posterior covariance of log {a} and log {b} (Laplace)"}))
        for name, dt, ln in (("objective", "f8", "negative log posterior at the estimate (constants dropped)"),
                             ("chi2", "f8", "sum of squared weighted residuals"),
                             ("n_obs", "f8", "number of observations fitted"),
                             ("iterations", "i4", "Levenberg-Marquardt iterations")):
            v.append(VarSpec(f"calibration/{name}", ("patient",), dt, {"units": "1", "long_name": ln}))
        a = self.job.assimilation
        if a is not None:
            u = m.unit_of(a.output)
            for ld in a.leads:
                for q in ("p05", "p50", "p95"):
                    v.append(VarSpec(f"forecast/{a.output}_h{ld:g}_{q}", ("patient", "time"), "f8", {
                        "units": u, "lead": ld, "long_name": f"EnKF forecast of {a.output} made at this time for "
                                                             f"time + {ld:g} {m.time_unit}: {q[1:]}th percentile"}))
            v.append(VarSpec(f"forecast/{a.output}_analysis", ("patient", "time"), "f8", {
                "units": u, "long_name": f"EnKF ensemble-mean {a.output} after assimilating this time's observation"}))
            for p in a.parameters:
                v.append(VarSpec(f"forecast/{p}", ("patient", "time"), "f8", {
                    "units": m.unit_of(p), "long_name": f"EnKF estimate of {p} (exp of the ensemble-mean log)"}))
            for r in a.alerts:
                kind, val = r.rule()
                cond = {"below": f"< {val:g}", "above": f"> {val:g}", "rise": f"rises by > {val:g}",
                        "fall": f"falls by > {val:g}"}[kind]
                v.append(VarSpec(f"alerts/{r.name}", ("patient", "time"), "i1", {
                    "long_name": f"alert raised: P({a.output} {cond} within {r.within:g} {m.time_unit}) >= {r.probability:g}",
                    "flag_values": np.array([0, 1], "i1"), "flag_meanings": "none raised"}))
                v.append(VarSpec(f"alerts/{r.name}_probability", ("patient", "time"), "f8", {
                    "units": "1", "long_name": f"forecast probability of {a.output} {cond} within {r.within:g} {m.time_unit}"}))
                v.append(VarSpec(f"alerts/{r.name}_lead", ("patient", "time"), "f8", {
                    "units": m.time_unit, "long_name": "median predicted time to the crossing (NaN: most members do not cross)"}))
        return Layout(len(self.obs.patients), self.grid, m.time_unit, v, self.job.job.chunk_size)

    def opts(self) -> SolverOptions:
        s = self.job.solver
        atol = s.atol if not isinstance(s.atol, dict) else s.atol.get("default", 1e-10)
        return SolverOptions(method=s.method, rtol=s.rtol, atol=atol, max_steps=s.max_steps, dt=s.dt,
                             first_step=s.first_step)

    def problem(self, cid: int) -> FitProblem:
        s, e = self.layout.chunk_bounds(cid)
        pats = self.obs.patients[s:e]
        c = self.job.calibration
        prob = build_problem(self.model, pats, self.params, self.outputs, dict(self.job.model.parameters), self.mu,
                             self.omega, self.err_add, self.err_prop, self.obs.dose_route, self.backend.name, self.opts(),
                             dict(self.job.observations.inputs), c.infusion_duration)
        _, y = observation_grid(pats, self.outputs)
        # every chunk on the global grid: a chunk's numbers must not depend on its neighbours
        yy = np.full((len(self.outputs), e - s, len(self.grid)), np.nan)
        for j, p in enumerate(pats):
            for i, o in enumerate(self.outputs):
                if o in p.obs:
                    yy[i, j, np.searchsorted(self.grid, p.obs[o][0])] = p.obs[o][1]
        return replace(prob, times=self.grid, y=yy, err_tau=self.err_tau)

    def compute_chunk(self, cid: int) -> dict[str, np.ndarray]:
        prob = self.problem(cid)
        fit = map_fit(prob, max_iter=self.job.calibration.max_iter)
        s, e = self.layout.chunk_bounds(cid)
        arrays: dict[str, np.ndarray] = {}
        for i, o in enumerate(self.outputs):
            arrays[o] = np.ascontiguousarray(fit.pred[i])
            arrays[f"observed/{o}"] = np.ascontiguousarray(prob.y[i])
            arrays[f"residuals/{o}"] = np.ascontiguousarray((prob.y[i] - fit.pred[i]) / fit.sigma[i])
        arrays["status"] = fit.status.astype(np.int8)
        arrays["arm"] = np.zeros(e - s, np.int16)
        pn = self.model.parameter_names
        for j, p in enumerate(pn):
            arrays[f"cohort/{p}"] = (np.exp(fit.phi[:, self.params.index(p)]) if p in self.params
                                     else prob.P[j].astype(float)).copy()
        arrays["cohort/pseudonym"] = np.array([p.pseudonym for p in self.obs.patients[s:e]], dtype="S64")
        sd = fit.sd()
        for j, p in enumerate(self.params):
            arrays[f"calibration/{p}_sd_log"] = sd[:, j].copy()
        for i, a in enumerate(self.params):
            for j in range(i, len(self.params)):
                arrays[f"calibration/cov/{a}__{self.params[j]}"] = fit.cov[:, i, j].copy()
        arrays["calibration/objective"] = fit.objective.astype(float)
        arrays["calibration/chi2"] = fit.chi2.astype(float)
        arrays["calibration/n_obs"] = fit.n_obs.astype(float)
        arrays["calibration/iterations"] = fit.iterations.astype(np.int32)
        if self.job.assimilation is not None:
            arrays.update(self.assimilate(prob, s, e))
        return arrays

    def assimilate(self, prob: FitProblem, s: int, e: int) -> dict[str, np.ndarray]:
        from ..assimilate import AlertRule, EnkfConfig, run_enkf

        a = self.job.assimilation
        sel = [self.params.index(p) for p in a.parameters]
        rules = [AlertRule(r.name, r.output, r.rule()[1], r.rule()[0], r.within, r.probability, r.refractory)
                 for r in a.alerts]
        cfg = EnkfConfig(a.output, list(a.parameters), np.asarray(self.mu)[sel], np.asarray(self.omega)[np.ix_(sel, sel)],
                         a.obs_sd, a.members, a.inflation, a.horizon, a.lead_step, tuple(a.leads),
                         rules=rules, seed=self.job.job.seed, backend=self.backend.name, opts=self.opts())
        y = prob.y[self.outputs.index(a.output)]
        r = run_enkf(self.model, prob.P, prob.events, self.grid, y, np.arange(s, e, dtype=np.int64), cfg)
        out: dict[str, np.ndarray] = {}
        for ld in a.leads:
            for i, q in enumerate(("p05", "p50", "p95")):
                out[f"forecast/{a.output}_h{ld:g}_{q}"] = np.ascontiguousarray(r.forecast[ld][i])
        out[f"forecast/{a.output}_analysis"] = np.ascontiguousarray(r.analysis)
        for j, p in enumerate(a.parameters):
            out[f"forecast/{p}"] = np.ascontiguousarray(np.exp(r.params[:, j]))
        for rule in a.alerts:
            out[f"alerts/{rule.name}"] = r.alert[rule.name].astype(np.int8)
            out[f"alerts/{rule.name}_probability"] = np.ascontiguousarray(r.probability[rule.name])
            out[f"alerts/{rule.name}_lead"] = np.ascontiguousarray(r.crossing[rule.name])
        return out

    def fit_population(self, comm) -> None:
        c = self.job.calibration
        n_ch = self.layout.n_chunks()
        mine = {cid: self.problem(cid) for cid in range(n_ch) if cid % comm.size == comm.rank}
        pop, _ = population_fit_chunks(mine, n_ch, comm, c.population_error, c.population_max_iter, 1e-5, True,
                                       self.mu, self.omega, self.err_add, self.err_prop)
        self.population = {"parameters": self.params, "typical": np.exp(pop.mu).tolist(), "mu": pop.mu.tolist(),
                           "omega": pop.omega.tolist(), "cv_percent": pop.cv().tolist(),
                           "err_add": pop.err_add.tolist(), "err_prop": pop.err_prop.tolist(),
                           "iterations": pop.iterations, "converged": bool(pop.converged),
                           "method": "Laplace EM (conditional modes + Laplace covariances, diagonal omega)"}
        self.mu, self.omega, self.err_add, self.err_prop = pop.mu, pop.omega, pop.err_add, pop.err_prop

    def manifest(self) -> dict:
        lay = self.layout
        return {"format": "twin-calibration/1", "job_name": self.job.job.name, "job_sha256": self.loaded.sha256,
                "cohort_fingerprint": self.obs.sha256, "n_patients": lay.n_patients, "chunk_size": lay.chunk_size,
                "n_times": int(len(lay.time)), "vars": [[v.path, list(v.dims), v.dtype] for v in lay.vars]}


def calibrate(loaded: LoadedCalibration, run_dir: Path, comm, quiet: bool = False) -> int:
    stop = StopFlag()
    stop.install()
    plan = plan_on_every_rank(comm, lambda: CalibrationPlan(loaded, local_rank_of(comm)))
    t0 = time.time()
    if loaded.job.calibration.population:
        try:
            plan.fit_population(comm)
        except RuntimeError as e:
            raise TwinError(f"{loaded.path}: {e}") from None
    t_pop = time.time() - t0
    record = {"kind": KIND, "observations_sha256": plan.obs.sha256, "model": plan.model.name,
              "model_sha256": model_sha256(plan.model)}
    with open_attempt(run_dir, comm, loaded, plan.layout, plan.manifest, plan.backend, loaded.job.job.seed,
                      record, on_open=lambda: _write_issues(run_dir, plan.obs)) as (attempt, done, prov):
        return _fit_chunks(plan, run_dir, comm, quiet, stop, attempt, done, prov, t_pop)


def model_sha256(model) -> str:
    """Fingerprint of the model declaration that produced the twins (equations, defaults, units)."""
    import hashlib

    return hashlib.sha256(repr(model).encode()).hexdigest()


def _write_issues(run_dir: Path, obs: Observations) -> None:
    with open(run_dir / "import_issues.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["record", "field", "message"])
        for i in obs.issues:
            w.writerow([i.record, i.field, i.message])


def _fit_chunks(plan: CalibrationPlan, run_dir, comm, quiet, stop, attempt, done, prov, t_pop) -> int:
    rank, size = comm.rank, comm.size
    lay = plan.layout
    _setup_rank_log(run_dir, rank)
    todo = [c for c in range(lay.n_chunks()) if c not in done]
    log.info("calibration attempt %d: %d chunks, %d done, %d to fit on %d ranks", attempt, lay.n_chunks(), len(done),
             len(todo), size)
    t0 = time.time()

    def compute(cid):
        stop.check()
        return plan.compute_chunk(cid)

    all_entries, interrupted, n_fit = process_chunks(lay, compute, run_dir, comm, stop, attempt, done)
    code = EXIT_INTERRUPTED if interrupted else EXIT_OK
    if rank == 0:
        elapsed = time.time() - t0
        if interrupted or len(all_entries) < lay.n_chunks():
            provenance.append_record(run_dir, {"event": "interrupted", "attempt": attempt,
                                               "chunks_done": len(all_entries), "time": provenance.utc_now()})
            _say(quiet, f"twin: interrupted: {len(all_entries)}/{lay.n_chunks()} chunks saved in {run_dir}; "
                        f"rerun the same command to resume (exit {EXIT_INTERRUPTED})")
            code = EXIT_INTERRUPTED
        else:
            digest = provenance.result_digest(all_entries)
            head = provenance.append_record(run_dir, {"event": "complete", "kind": KIND, "attempt": attempt,
                                                      "chunks_done": len(all_entries), "result_sha256": digest,
                                                      "time": provenance.utc_now()})
            job = plan.job
            attrs = {**prov, "kind": KIND, "job_name": job.job.name, "model": plan.model.name,
                     "model_reference": plan.model.reference, "model_sha256": model_sha256(plan.model),
                     "backend": plan.backend.name,
                     "device": plan.backend.device, "ranks": size, "attempt": attempt, "end_time": provenance.utc_now(),
                     "n_patients": lay.n_patients, "observations_sha256": plan.obs.sha256,
                     "observations_format": job.observations.format,
                     "n_records": plan.obs.n_records, "n_imported": plan.obs.n_imported,
                     "n_import_issues": len(plan.obs.issues), "n_excluded_no_consent": plan.obs.n_excluded_no_consent,
                     "n_registry_without_records": plan.obs.n_without_records,
                     "prior": json.dumps({"parameters": plan.params, "typical": dict(job.calibration.prior),
                                          "omega": job.calibration.omega}),
                     "population": json.dumps(plan.population) if plan.population else "",
                     "fit_seconds": round(elapsed, 3), "population_seconds": round(t_pop, 3),
                     "result_sha256": digest, "audit_head": head}
            path = store.build_master(run_dir, lay, all_entries, attrs)
            import h5py

            with h5py.File(path, "r") as f:
                st = f["status"][:]
            counts = ", ".join(f"{int((st == c).sum())} {FIT_NAMES[c]}" for c in sorted(FIT_NAMES) if (st == c).any())
            rate = f", {n_fit / elapsed:,.0f} patients/s" if n_fit and elapsed > 0 else ""
            _say(quiet, f"twin: wrote {path} ({lay.n_patients} twins calibrated: {counts}; "
                        f"{len(plan.obs.issues)} records rejected, {plan.obs.n_excluded_no_consent} patients without consent; "
                        f"{elapsed:.1f} s{rate})")
    return comm.bcast(code, root=0)
