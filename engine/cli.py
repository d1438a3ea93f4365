"""`twin` command line. User errors print one line (no traceback) and exit with EXIT_USER.

Exit codes: 0 ok; 1 internal error; 2 bad input; 3 audit failure; 75 interrupted by
SIGTERM/SIGINT after flushing finished chunks (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_OK, EXIT_USER, TwinError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twin", description="twin-engine: batch simulation of virtual patient cohorts")
    p.add_argument("--version", action="version", version=f"twin-engine {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run or resume a job (also under mpiexec/srun)")
    r.add_argument("job", help="job file (.toml)")
    r.add_argument("-o", "--output", help="run directory (default runs/<job name>)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar (batch logs)")

    c = sub.add_parser("calibrate", help="fit every patient's twin to its observations (also under mpiexec/srun)")
    c.add_argument("job", help="calibration job file (.toml)")
    c.add_argument("-o", "--output", help="run directory (default runs/<job name>)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stdout")

    v = sub.add_parser("validate", help="check a job file and print what it would run")
    v.add_argument("job")

    s = sub.add_parser("summary", help="per-arm statistics of a result (Dask)")
    s.add_argument("result", help="RUN.h5 or run directory")

    rp = sub.add_parser("report", help="PNG plots of a result")
    rp.add_argument("result", help="RUN.h5 or run directory")
    rp.add_argument("-o", "--output", required=True, help="directory for the plots")

    a = sub.add_parser("audit", help="verify a run's audit chain and result digest")
    a.add_argument("run_dir")

    from .bench import add_arguments as _bench_args

    _bench_args(sub.add_parser("bench", help="benchmark suite (kernels, IO, end-to-end, MPI scaling): JSON + Markdown"))

    sb = sub.add_parser("submit", help="render a Slurm batch script for a job (or a screen of jobs) and sbatch it")
    sb.add_argument("jobs", nargs="+", metavar="JOB.toml", help="job file; several make a screen (job array)")
    sb.add_argument("-o", "--output", help="run directory (default runs/<job name>, runs/<first>-screen)")
    sb.add_argument("--nodes", type=int)
    sb.add_argument("--ntasks-per-node", type=int, help="MPI ranks per node")
    sb.add_argument("--gpus-per-task", type=int, help="> 0: GPU template, one rank per GPU")
    sb.add_argument("--cpus-per-task", type=int, help="OpenMP threads per rank")
    sb.add_argument("--time", help="time limit (HH:MM:SS, D-HH:MM:SS, minutes)")
    sb.add_argument("--signal-seconds", type=int, help="SIGTERM this long before the time limit")
    sb.add_argument("--partition")
    sb.add_argument("--account")
    sb.add_argument("--requeue", action="store_true", help="a job that requeues itself until it is done")
    sb.add_argument("--array-shards", type=int, help="screen: split the jobs into S array tasks")
    sb.add_argument("--array-parallel", type=int, help="screen: at most M array tasks at once")
    sb.add_argument("--template", help="a batch script template of your own (default: slurm/*.sbatch)")
    sb.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")

    from .docking.dock_cli import add_arguments as _dock_args

    _dock_args(sub.add_parser("dock", help="dock one ligand into one receptor (AutoDock Vina scoring and options)"))
    po = sub.add_parser("poses", help="export the top hits' poses of a docking screen (PDBQT or SDF)")
    po.add_argument("result", help="RUN.h5 or run directory")
    po.add_argument("-o", "--output", required=True, help="directory for the pose files")
    po.add_argument("--top", type=int, default=10, help="hits per target (default 10)")
    po.add_argument("--format", default="pdbqt", choices=["pdbqt", "sdf"])

    st = sub.add_parser("status", help="progress of a run (or screen) from its journal, and its Slurm state")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true", help="machine-readable")
    return p


def _is_rank0() -> bool:
    for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if k in os.environ:
            return os.environ[k] == "0"
    return True


def _cmd_run(args) -> int:
    from .config import load_job
    from .parallel import world
    from .runner import run

    loaded = load_job(args.job)
    out = Path(args.output) if args.output else Path("runs") / loaded.job.job.name
    comm = world()
    if getattr(loaded.job, "docking", None) is not None:  # a docking screen (engine.docking.screen)
        from .docking.screen import run as run_screen

        return run_screen(loaded, out, comm, quiet=args.quiet)
    if hasattr(loaded.job, "tissue"):  # one organ on a voxel grid (engine.tissue)
        from .tissue.runner import run_tissue

        return run_tissue(loaded, out, comm, quiet=args.quiet)
    return run(loaded, out, comm, quiet=args.quiet)


def _cmd_calibrate(args) -> int:
    from .calibrate.job import load_calibration
    from .calibrate.run import calibrate
    from .parallel import world

    loaded = load_calibration(args.job)
    out = Path(args.output) if args.output else Path("runs") / loaded.job.job.name
    return calibrate(loaded, out, world(), quiet=args.quiet)


def _cmd_validate(args) -> int:
    from .config import load_job

    if _is_calibration_job(args.job):
        from .calibrate.job import load_calibration
        from .calibrate.run import CalibrationPlan

        loaded = load_calibration(args.job)
        plan = CalibrationPlan(loaded)  # what calibrate would refuse: model, backend, import, key
        c = loaded.job.calibration
        print(f"{args.job}: ok")
        print(f"  calibration {loaded.job.job.name}: model {plan.model.name}, {len(plan.obs.patients)} patients "
              f"({plan.obs.n_imported}/{plan.obs.n_records} records importable, {len(plan.obs.issues)} rejected), "
              f"estimating {', '.join(c.parameters)}{' with a population fit' if c.population else ''}"
              f"{'; EnKF assimilation' if loaded.job.assimilation else ''}; sha256 {loaded.sha256[:16]}")
        return EXIT_OK

    from .runner import make_plan

    loaded = load_job(args.job)
    j = loaded.job
    if getattr(j, "docking", None) is not None:  # a docking screen
        from .docking.screen import make_plan as dock_plan

        plan = dock_plan(loaded)
        d = j.docking
        print(f"{args.job}: ok")
        print(f"  job {j.job.name}: docking screen, {len(plan.library)} ligands x {len(d.targets)} targets "
              f"({', '.join(t.name for t in d.targets)}) in chunks of {j.job.chunk_size}, exhaustiveness "
              f"{d.exhaustiveness}, seed {j.job.seed}; sha256 {loaded.sha256[:16]}")
        return EXIT_OK
    if hasattr(j, "tissue"):
        from .tissue.setup import make_plan as tissue_plan

        tp = tissue_plan(loaded)
        print(f"{args.job}: ok")
        print(f"  tissue job {j.job.name}: cell model {tp.model.name}, grid {tp.geom.shape} "
              f"({int(tp.geom.mask.sum())} tissue voxels) at dx {j.tissue.dx} mm, dt {j.tissue.dt} ms "
              f"(stability limit {tp.dt_limit:.4g} ms), end {j.tissue.end_time} ms; sha256 {loaded.sha256[:16]}")
        return EXIT_OK
    from .models import job_model

    model = job_model(loaded)
    plan = make_plan(loaded)  # what run would refuse, validate refuses: backend, cohort build (CSV, key), names
    if j.pacing is not None:
        lay = plan.layout
        print(f"{args.job}: ok")
        print(f"  job {j.job.name}: model {model.name}, {plan.cohort.n} cells x {lay.n_patients // max(plan.cohort.n, 1)} "
              f"conditions = {lay.n_patients} items in {lay.n_chunks()} chunks of {j.job.chunk_size}, seed {j.job.seed}, "
              f"backend {j.job.backend}; sha256 {loaded.sha256[:16]}")
        return EXIT_OK
    n = j.cohort.size if j.cohort.size is not None else (
        f"calibrated twins of {j.cohort.calibrated.run}" if j.cohort.calibrated is not None else f"CSV {j.cohort.csv.path}")
    n_chunks = f"{-(-j.cohort.size // j.job.chunk_size)} chunks of {j.job.chunk_size}" if j.cohort.size else f"chunks of {j.job.chunk_size}"
    print(f"{args.job}: ok")
    print(f"  job {j.job.name}: model {model.name}, {n} patients in {n_chunks}, seed {j.job.seed}, backend {j.job.backend}")
    print(f"  arms: {', '.join(a.name for a in j.arms)}; outputs {', '.join(j.outputs.variables)} "
          f"at {len(j.outputs.time_values())} times; sha256 {loaded.sha256[:16]}")
    return EXIT_OK


def _is_screen(result) -> bool:
    import h5py

    p = Path(result)
    p = p / "RUN.h5" if p.is_dir() else p
    try:
        with h5py.File(p, "r") as f:
            return "screen" in f and "biomarkers" in f and "qNet" in f["biomarkers"]
    except OSError:
        return False


def _is_calibration_job(path) -> bool:
    import tomllib

    try:
        return "calibration" in tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # load_job reports the problem


def _cmd_summary(args) -> int:
    from .docking.analysis import is_docking_result
    from .tissue.analysis import is_tissue_run

    if is_tissue_run(args.result):  # activation/APD maps, conduction, ECG
        from .tissue.analysis import summary_text as tissue_text

        print(tissue_text(args.result))
        return EXIT_OK

    if is_docking_result(args.result):  # a docking screen: hits ranked per target
        from .docking.analysis import summary as dock_summary

        print(dock_summary(args.result))
        return EXIT_OK
    from .analysis import summary
    from .calibrate.summary import is_calibration, summary_text

    if is_calibration(args.result):  # twins fitted by `twin calibrate`: estimates, fit flags, alerts
        print(summary_text(args.result))
        return EXIT_OK
    print(summary(args.result))
    if _is_screen(args.result):
        from .cipa import summary_text as tdp_text

        try:
            print(tdp_text(args.result))
        except ValueError as e:  # e.g. no labelled training drugs: nothing to classify
            print(f"TdP risk classification: not done ({e})")
    from .analysis import open_run

    ds = open_run(args.result)
    trial = "[trial]" in str(ds.attrs.get("job_toml", ""))
    ds.close()
    if trial:
        from .trial_analysis import subgroup_text

        print(subgroup_text(args.result))
    return EXIT_OK


def _cmd_report(args) -> int:
    from .docking.analysis import is_docking_result
    from .tissue.analysis import is_tissue_run

    if is_tissue_run(args.result):
        from .tissue.analysis import report as tissue_report

        for p in tissue_report(args.result, args.output):
            print(p)
        return EXIT_OK

    if is_docking_result(args.result):
        from .docking.analysis import report as dock_report

        for p in dock_report(args.result, args.output):
            print(p)
        return EXIT_OK
    from .analysis import report
    from .calibrate.summary import is_calibration

    if is_calibration(args.result):  # individual fits, residual diagnostics, forecasts and alerts
        from .calibrate.report import report
    paths = report(args.result, args.output)
    if _is_screen(args.result):
        from .cipa import report_plots

        try:
            paths += report_plots(args.result, args.output)
        except ValueError as e:
            print(f"TdP risk plots: not drawn ({e})")
    for p in paths:
        print(p)
    return EXIT_OK


def _cmd_audit(args) -> int:
    from .errors import EXIT_AUDIT
    from .provenance import verify

    problems = verify(args.run_dir)
    if problems:
        for p in problems:
            print(f"twin audit: {p}", file=sys.stderr)
        return EXIT_AUDIT
    print(f"{args.run_dir}: audit chain and result digest verified")
    return EXIT_OK


def _cmd_submit(args) -> int:
    from .submit import plan, submit

    keys = ("nodes", "ntasks_per_node", "gpus_per_task", "cpus_per_task", "time", "signal_seconds", "partition",
            "account")
    sub = plan(args.jobs, run_dir=args.output, overrides={k: getattr(args, k) for k in keys},
               requeue=args.requeue, array_shards=args.array_shards, template=args.template,
               array_limit=args.array_parallel)
    if args.dry_run:
        print(sub.script, end="")
        return EXIT_OK
    job_id = submit(sub)
    what = f"array of {sub.shards} task{'s' if sub.shards > 1 else ''} over {len(sub.jobs)} jobs" if sub.kind == "array" \
        else f"{sub.kind} job"
    print(f"submitted {what} as Slurm job {job_id}: {sub.script_path}")
    print(f"follow it with: twin status {sub.run_dir}")
    return EXIT_OK


def _cmd_status(args) -> int:
    import json

    from .submit import format_status, status

    res = status(args.run_dir)
    print(json.dumps(res, indent=1) if args.json else format_status(res))
    return EXIT_OK


def _cmd_poses(args) -> int:
    from .docking.analysis import export_poses

    for p in export_poses(args.result, args.output, args.top, args.format):
        print(p)
    return EXIT_OK


def _cmd_dock(args) -> int:
    from .docking.dock_cli import run

    return run(args)


def _cmd_bench(args) -> int:
    from .bench import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cmd = {"run": _cmd_run, "validate": _cmd_validate, "summary": _cmd_summary, "report": _cmd_report,
           "audit": _cmd_audit, "bench": _cmd_bench, "submit": _cmd_submit, "status": _cmd_status,
           "calibrate": _cmd_calibrate, "dock": _cmd_dock, "poses": _cmd_poses}[args.cmd]
    try:
        return cmd(args)
    except TwinError as e:
        if _is_rank0():
            print(f"twin: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("twin: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        print("twin: internal error (a bug: please report it with the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
