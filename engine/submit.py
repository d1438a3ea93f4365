"""`twin submit` and `twin status`: Slurm batch scripts from templates, and progress from the journal.

`twin submit JOB.toml` picks a template from `slurm/` (overridable with $TWIN_SLURM_TEMPLATES or
--template), fills its lowercase `${name}` placeholders from the job's `[slurm]` section and the
command line (the command line wins), writes the script to RUN_DIR/slurm/, submits it with
`sbatch --parsable` and records the submission in RUN_DIR/slurm/submissions.jsonl.

| template               | when                                  |
|------------------------|---------------------------------------|
| cohort_mpi.sbatch      | default: MPI ranks on CPU nodes       |
| cohort_gpu.sbatch      | gpus_per_task > 0: one rank per GPU   |
| cohort_requeue.sbatch  | --requeue: requeues itself until done |
| screen_array.sbatch    | several job files or --array-shards   |

A screen is a library of job files (one per compound, regimen, model variant…). Its directory
holds screen.tsv (index, job file, run directory per line) and one run directory per job
(SCREEN_DIR/<job name>); with S shards, array task t runs the jobs whose index i has i % S == t.
(A single cohort is not split over array tasks: one run directory is written by one `twin run` at a
time; its chunks are spread over MPI ranks instead.)

`twin status RUN_DIR` reads the run's own records, so it works the same with or without Slurm, and
after the job has left the queue: chunks journaled / remaining, failed patients, attempts, the last
audit record, whether RUN.h5 is written, and the Slurm state of the last submission when squeue,
scontrol or sacct still know it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import string
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from . import store
from .config import LoadedJob, SlurmSection, load_job
from .errors import StoreError, TwinError

TEMPLATES = {
    "cpu": "cohort_mpi.sbatch",
    "gpu": "cohort_gpu.sbatch",
    "requeue": "cohort_requeue.sbatch",
    "array": "screen_array.sbatch",
}
SUBMISSIONS = "slurm/submissions.jsonl"
SCREEN_LIST = "screen.tsv"
DEFAULT_MAX_REQUEUES = 20
# what goes unquoted into #SBATCH lines and the script: no blanks, quotes, $, %, ;, …
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+:@,=\-]+$")


# ------------------------------------------------------------------------------------ resources
@dataclass
class Resources:
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    time: str = "01:00:00"
    signal_seconds: int | None = None  # None: min(120, a tenth of the limit), at least 10 s
    partition: str | None = None
    account: str | None = None


def time_seconds(t: str) -> int:
    """Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds."""
    try:
        days = 0
        if "-" in t:
            d, t = t.split("-", 1)
            days = int(d)
            parts = [int(x) for x in t.split(":")]
            h, m, s = (parts + [0, 0])[:3]
        else:
            parts = [int(x) for x in t.split(":")]
            if len(parts) == 1:
                h, m, s = 0, parts[0], 0
            elif len(parts) == 2:
                h, (m, s) = 0, parts
            elif len(parts) == 3:
                h, m, s = parts
            else:
                raise ValueError
        return ((days * 24 + h) * 60 + m) * 60 + s
    except ValueError:
        raise TwinError(f"time limit {t!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS") from None


def resources(section: SlurmSection | None, overrides: dict) -> Resources:
    """[slurm] values, then command-line values (None = not given), validated."""
    r = Resources()
    for src in (section.model_dump() if section is not None else {}, overrides):
        for k, v in src.items():
            if v is not None and hasattr(r, k):
                setattr(r, k, v)
    # the command line is not checked by pydantic: check it the same way
    try:
        SlurmSection(**{k: v for k, v in asdict(r).items() if v is not None})
    except Exception as e:  # pydantic ValidationError: name the option
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            err = e.errors()[0]
            raise TwinError(f"twin submit: --{str(err['loc'][0]).replace('_', '-')} = {err.get('input')!r}: "
                            f"{err['msg']}") from None
        raise
    limit = time_seconds(r.time)
    if limit <= 0:
        raise TwinError(f"twin submit: --time {r.time!r} is zero")
    if r.signal_seconds is None:
        r.signal_seconds = max(10, min(120, limit // 10))
    if r.signal_seconds >= limit:
        raise TwinError(f"twin submit: --signal-seconds {r.signal_seconds} is not shorter than the time limit "
                        f"{r.time} ({limit} s)")
    return r


# ------------------------------------------------------------------------------------ templates
class SbatchTemplate(string.Template):
    """Only `${lowercase_name}` is a placeholder; `$NAME`, `${NAME:-x}`, `$((…))` are shell."""

    flags = re.VERBOSE
    pattern = r"""
        \$(?:
          (?P<escaped>(?!))                 |
          (?P<named>(?!))                   |
          \{(?P<braced>[a-z][a-z0-9_]*)\}   |
          (?P<invalid>(?!))
        )
    """


def template_dir() -> Path:
    """$TWIN_SLURM_TEMPLATES, else the source checkout's slurm/, else the copy a wheel installs
    under <prefix>/share/twin-engine/slurm."""
    env = os.environ.get("TWIN_SLURM_TEMPLATES")
    if env:
        return Path(env)
    src = Path(__file__).resolve().parent.parent / "slurm"
    if src.is_dir():
        return src
    import sysconfig

    return Path(sysconfig.get_path("data")) / "share" / "twin-engine" / "slurm"


def placeholders(text: str) -> set[str]:
    return {m.group("braced") for m in SbatchTemplate.pattern.finditer(text)}  # compiled by Template


def render(text: str, values: dict, source: str = "template") -> str:
    missing = sorted(placeholders(text) - set(values))
    if missing:
        raise TwinError(f"{source}: unknown placeholder(s) {', '.join('${' + m + '}' for m in missing)}; "
                        f"known: {', '.join(sorted(values))}")
    return SbatchTemplate(text).substitute({k: str(v) for k, v in values.items()})


def _safe(p: Path | str, what: str) -> str:
    s = str(p)
    if not _SAFE_PATH.match(s):
        raise TwinError(f"{what} {s!r}: twin submit writes paths unquoted into #SBATCH lines, so only letters, "
                        "digits and _ . / + : @ , = - are allowed; move or rename it")
    return s


def twin_command() -> str:
    """How the batch script starts `twin` on the compute nodes: this installation's."""
    exe = Path(sys.executable)
    script = exe.parent / "twin"
    if script.is_file() and os.access(script, os.X_OK):
        return _safe(script, "twin executable")
    return f"{_safe(exe, 'Python executable')} -m engine.cli"


def _directives(r: Resources, kind: str) -> str:
    lines = []
    if r.partition:
        lines.append(f"#SBATCH --partition={r.partition}")
    if r.account:
        lines.append(f"#SBATCH --account={r.account}")
    if r.gpus_per_task and kind != "gpu":  # the GPU template has its own line
        lines.append(f"#SBATCH --gpus-per-task={r.gpus_per_task}")
    return "\n".join(lines)


@dataclass
class Submission:
    kind: str
    template: Path
    script: str  # rendered
    run_dir: Path
    script_path: Path
    jobs: list[tuple[LoadedJob, Path]]  # (job, its run directory)
    resources: Resources
    shards: int = 1

    def screen_list(self) -> str:
        return "".join(f"{i}\t{j.path}\t{d}\n" for i, (j, d) in enumerate(self.jobs))


def plan(job_files: list[str], *, run_dir: str | None = None, overrides: dict | None = None,
         requeue: bool = False, array_shards: int | None = None, template: str | None = None,
         max_requeues: int = DEFAULT_MAX_REQUEUES, array_limit: int | None = None) -> Submission:
    if not job_files:
        raise TwinError("twin submit: give a job file")
    loaded = [load_job(p) for p in job_files]
    screen = len(loaded) > 1 or array_shards is not None
    if screen and requeue:
        raise TwinError("twin submit: --requeue is for one job; a screen is resumed by submitting it again")
    r = resources(loaded[0].job.slurm, overrides or {})
    kind = "array" if screen else "requeue" if requeue else "gpu" if r.gpus_per_task else "cpu"
    first = loaded[0].job.job.name
    if run_dir:
        out = Path(run_dir).absolute()
    else:
        out = (Path("runs") / (f"{first}-screen" if screen else first)).absolute()
    _safe(out, "run directory")
    jobs: list[tuple[LoadedJob, Path]] = []
    if screen:
        names = [j.job.job.name for j in loaded]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TwinError(f"twin submit: job names must differ within a screen (each gets SCREEN_DIR/<name>); "
                            f"repeated: {', '.join(dup)}")
        jobs = [(j, out / j.job.job.name) for j in loaded]
        shards = array_shards if array_shards is not None else len(loaded)
        if not 1 <= shards <= len(loaded):
            raise TwinError(f"twin submit: --array-shards {shards}: must be between 1 and the number of jobs "
                            f"({len(loaded)})")
    else:
        jobs = [(loaded[0], out)]
        shards = 1
    for j, d in jobs:
        _safe(j.path, "job file")
        check_run_dir(d, j)
    tpath = Path(template) if template else template_dir() / TEMPLATES[kind]
    try:
        text = tpath.read_text(encoding="utf-8")
    except OSError as e:
        raise TwinError(f"twin submit: template {tpath}: {e.strerror or e}") from None
    values = {
        "job_name": f"{first}-screen" if screen else first,
        "job": jobs[0][0].path,
        "run_dir": out,
        "twin": twin_command(),
        "nodes": r.nodes,
        "ntasks_per_node": r.ntasks_per_node,
        "gpus_per_task": r.gpus_per_task,
        "cpus_per_task": r.cpus_per_task,
        "time": r.time,
        "signal_seconds": r.signal_seconds,
        "directives": _directives(r, kind),
        "max_requeues": max_requeues,
        "shards": shards,
        "last_task": shards - 1,
        "array_limit": f"%{array_limit}" if array_limit else "",
    }
    script = render(text, values, str(tpath))
    head = (f"# rendered by `twin submit` from {tpath.name} for {', '.join(str(j.path) for j, _ in jobs[:3])}"
            f"{' …' if len(jobs) > 3 else ''} (job sha256 {jobs[0][0].sha256[:16]})\n")
    if script.startswith("#!"):
        nl = script.index("\n") + 1
        script = script[:nl] + head + script[nl:]
    else:
        script = head + script
    return Submission(kind, tpath, script, out, out / "slurm" / tpath.name, jobs, r, shards)


def check_run_dir(run_dir: Path, job: LoadedJob) -> None:
    """Refuse early what `twin run` would refuse on the cluster: a run directory of another job."""
    p = run_dir / store.MANIFEST
    if p.is_file():
        try:
            m = store.load_manifest(run_dir)
        except StoreError:
            return  # twin run says what is wrong with it
        if m.get("job_fingerprint") not in (None, job.fingerprint):
            raise TwinError(f"run directory {run_dir} holds another job (fingerprint "
                            f"{str(m.get('job_fingerprint'))[:16]}…, this one is {job.fingerprint[:16]}…): use "
                            "another -o, or the job file it was run with ([slurm] resources and comments may differ)")


def submit(sub: Submission, sbatch: str = "sbatch") -> str:
    """Write the script (and screen list) into the run directory, sbatch it, record it; the job id."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise TwinError(f"twin submit: {sbatch} not found (no Slurm here?); `twin submit --dry-run` prints the script")
    (sub.run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    if sub.kind == "array":
        (sub.run_dir / SCREEN_LIST).write_text(sub.screen_list(), encoding="utf-8")
    sub.script_path.write_text(sub.script, encoding="utf-8")
    os.chmod(sub.script_path, 0o755)
    try:
        p = subprocess.run([exe, "--parsable", str(sub.script_path)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise TwinError("twin submit: sbatch did not answer in 120 s") from None
    if p.returncode != 0:
        msg = " ".join((p.stderr or p.stdout).split())
        raise TwinError(f"twin submit: sbatch refused {sub.script_path}: {msg}")
    job_id = p.stdout.strip().split(";")[0]
    rec = {"job_id": job_id, "time": _now(), "kind": sub.kind, "script": str(sub.script_path.relative_to(sub.run_dir)),
           "jobs": [str(j.path) for j, _ in sub.jobs], "job_sha256": [j.sha256 for j, _ in sub.jobs],
           "resources": asdict(sub.resources), "shards": sub.shards}
    with open(sub.run_dir / SUBMISSIONS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    return job_id


def _now() -> str:
    from .provenance import utc_now

    return utc_now()


# ------------------------------------------------------------------------------------ status
def _quiet_store():
    """read_journals warns about a torn last line: normal while a run is writing; not news here."""
    lg = logging.getLogger("twin.store")

    class _Ctx:
        def __enter__(self):
            self.level = lg.level
            lg.setLevel(logging.ERROR)

        def __exit__(self, *exc):
            lg.setLevel(self.level)

    return _Ctx()


def run_status(run_dir: str | Path) -> dict:
    """What a run directory says about its progress (no checksum verification: that is `twin run`'s)."""
    run_dir = Path(run_dir)
    out: dict = {"run_dir": str(run_dir), "started": (run_dir / store.MANIFEST).is_file()}
    if out["started"]:
        m = store.load_manifest(run_dir)
        n, cs = int(m["n_patients"]), int(m["chunk_size"])
        n_chunks = -(-n // cs)
        first: dict[int, dict] = {}
        by_attempt: dict[int, int] = {}
        with _quiet_store():
            for attempt, _rank, _line, e in store.read_journals(run_dir):
                c = e["chunk"]
                if 0 <= c < n_chunks and c not in first:
                    first[c] = e
                    by_attempt[attempt] = by_attempt.get(attempt, 0) + 1
        out.update({
            "job_name": m.get("job_name"), "job_fingerprint": m.get("job_fingerprint"), "n_patients": n, "chunk_size": cs,
            "chunks": n_chunks, "done": len(first), "remaining": n_chunks - len(first),
            "failed_patients": int(sum(int(e.get("n_failed", 0)) for e in first.values())),
            "done_patients": int(sum(e["stop"] - e["start"] for e in first.values())),
            "chunks_by_attempt": {str(a): k for a, k in sorted(by_attempt.items())},
        })
    adir = run_dir / store.ATTEMPT_DIR
    out["attempts"] = len([x for x in os.listdir(adir) if x.isdigit()]) if adir.is_dir() else 0
    out["last_audit"] = _last_audit(run_dir)
    out["complete"] = (run_dir / store.MASTER).is_file()
    return out


def _last_audit(run_dir: Path) -> dict | None:
    p = run_dir / "audit.jsonl"
    if not p.is_file():
        return None
    last = None
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            last = rec
    if last is None:
        return None
    return {k: last[k] for k in ("event", "attempt", "time", "chunks_done", "ranks", "host") if k in last}


def last_submission(run_dir: Path) -> dict | None:
    p = run_dir / SUBMISSIONS
    if not p.is_file():
        return None
    recs = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    if not recs:
        return None
    recs[-1]["submissions"] = len(recs)
    return recs[-1]


def _cmd(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return p.stdout if p.returncode == 0 else None


def slurm_state(job_id: str) -> dict:
    """{'states': {STATE: count}, 'source': squeue|scontrol|sacct, 'restarts': n} or {'source': None}."""
    out = _cmd(["squeue", "-h", "-j", job_id, "-o", "%T"])
    states: dict[str, int] = {}
    if out and out.strip():
        for s in out.split():
            states[s] = states.get(s, 0) + 1
        res = {"states": states, "source": "squeue"}
    else:
        res = {"source": None}
    info = _cmd(["scontrol", "show", "job", job_id, "-o"])
    if info and info.strip():
        restarts = 0
        sc: dict[str, int] = {}
        for line in info.splitlines():
            for tok in line.split():
                if tok.startswith("JobState="):
                    s = tok.split("=", 1)[1]
                    sc[s] = sc.get(s, 0) + 1
                elif tok.startswith("Restarts="):
                    restarts = max(restarts, int(tok.split("=", 1)[1]))
        res["restarts"] = restarts
        if res["source"] is None and sc:
            res.update(states=sc, source="scontrol")
    if res["source"] is None:
        acct = _cmd(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
        if acct and acct.strip():
            for s in acct.split():
                s = s.split()[0]
                states[s] = states.get(s, 0) + 1
            res.update(states=states, source="sacct")
    return res


def status(run_dir: str | Path, query_slurm: bool = True) -> dict:
    run_dir = Path(run_dir)
    sub = last_submission(run_dir)
    screen = run_dir / SCREEN_LIST
    if screen.is_file():
        jobs = []
        for line in screen.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0].isdigit():
                st = run_status(parts[2])
                st["job_file"] = parts[1]
                jobs.append(st)
        res = {"screen": True, "run_dir": str(run_dir), "jobs": jobs,
               "complete": sum(1 for j in jobs if j["complete"]),
               "chunks": sum(j.get("chunks", 0) for j in jobs), "done": sum(j.get("done", 0) for j in jobs),
               "failed_patients": sum(j.get("failed_patients", 0) for j in jobs)}
    else:
        if not (run_dir / store.MANIFEST).is_file() and sub is None:
            raise StoreError(f"{run_dir}: not a run directory (no {store.MANIFEST}, no {SUBMISSIONS})")
        res = {"screen": False, **run_status(run_dir)}
    if sub is not None:
        res["slurm"] = {"job_id": sub["job_id"], "submitted": sub["time"], "kind": sub.get("kind"),
                        "submissions": sub["submissions"]}
        if query_slurm:
            res["slurm"].update(slurm_state(str(sub["job_id"])))
    return res


def _fmt_states(s: dict) -> str:
    if not s.get("source"):
        return "not known to squeue, scontrol or sacct here (left the queue, or another cluster)"
    st = ", ".join(f"{k}" if v == 1 else f"{k} ×{v}" for k, v in sorted(s["states"].items()))
    extra = f", {s['restarts']} requeue{'s' if s['restarts'] != 1 else ''}" if s.get("restarts") else ""
    return f"{st} ({s['source']}{extra})"


def _fmt_run(st: dict, indent: str = "  ") -> list[str]:
    if not st["started"]:
        return [f"{indent}not started (no run.json yet)"]
    pct = 100.0 * st["done"] / st["chunks"] if st["chunks"] else 100.0
    lines = [
        f"{indent}chunks: {st['done']} done, {st['remaining']} remaining of {st['chunks']} ({pct:.0f} %); "
        f"{st['failed_patients']} failed patient{'s' if st['failed_patients'] != 1 else ''} in done chunks",
    ]
    by = st.get("chunks_by_attempt") or {}
    att = f"{st['attempts']}" + (f" (chunks per attempt: {', '.join(f'{a}: {k}' for a, k in by.items())})" if by else "")
    lines.append(f"{indent}attempts: {att}")
    a = st.get("last_audit")
    if a:
        rest = ", ".join(f"{k} {a[k]}" for k in ("attempt", "chunks_done", "ranks") if k in a)
        lines.append(f"{indent}last audit record: {a['event']} ({rest}{', ' + a['time'] if 'time' in a else ''})")
    lines.append(f"{indent}result: " + ("RUN.h5 written (complete)" if st["complete"] else "RUN.h5 not written yet"))
    return lines


def format_status(res: dict) -> str:
    lines = []
    if res["screen"]:
        jobs = res["jobs"]
        lines.append(f"{res['run_dir']}: screen of {len(jobs)} jobs, {res['complete']} complete; "
                     f"{res['done']}/{res['chunks']} chunks done, {res['failed_patients']} failed patients")
        for j in jobs:
            head = f"  {Path(j['run_dir']).name}: "
            if not j["started"]:
                lines.append(head + "not started")
            else:
                lines.append(head + f"{j['done']}/{j['chunks']} chunks, {j['failed_patients']} failed patients, "
                             f"{j['attempts']} attempt{'s' if j['attempts'] != 1 else ''}, "
                             + ("complete" if j["complete"] else "not complete"))
    else:
        if res["started"]:
            lines.append(f"{res['run_dir']}: job {res['job_name']} (fingerprint {str(res['job_fingerprint'])[:16]}…), "
                         f"{res['n_patients']} patients in {res['chunks']} chunks of {res['chunk_size']}")
        else:
            lines.append(f"{res['run_dir']}:")
        lines += _fmt_run(res)
    s = res.get("slurm")
    if s:
        state = _fmt_states(s) if "source" in s else "not queried"
        lines.append(f"  slurm: job {s['job_id']} ({s['kind']}, submitted {s['submitted']}): {state}")
    return "\n".join(lines)
