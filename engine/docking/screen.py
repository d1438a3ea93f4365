"""The docking screen job: ligands (rows) × targets, chunked over MPI ranks, stored like every run.

Rows are ligands in library order; chunks of `job.chunk_size` ligands go to ranks through the
engine's chunk queue, are written to per-rank shards with the journal, and the master RUN.h5
stitches them (engine.store). A ligand's random streams come from (job seed, ligand index, target
index), so results are identical whatever the number of ranks, the chunk order or a resume.
A ligand that cannot be prepared or docked gets a status code and a reason; the screen goes on.
A chunk's prepared ligands are docked against each target as one batch (kernels.docking.batch) on
the job's backend: `cpu` (OpenMP over ligand × chain) or `cuda` (one GPU thread per chain).

RUN.h5 (row dimension `ligand`; extra dimensions `target`, `mode`, `atom`, `xyz`, `term`):
  name, smiles, ligand_pdbqt, n_atoms, n_torsions        per ligand
  status, reason, score, inter, intra, terms              per ligand × target (score: best pose)
  mode_score, pose                                        per ligand × target × mode (pose: f4 Å)
"""

from __future__ import annotations

import csv
import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import provenance, store
from ..config import LoadedJob
from ..errors import EXIT_INTERRUPTED, EXIT_OK, JobError
from ..layout import Layout, VarSpec
from .prepare import FAILURE_CODES, LigandFailure, prepare_mol3d, prepare_smiles, read_sdf

log = logging.getLogger("twin")
NAME_LEN, SMILES_LEN, REASON_LEN = 96, 1024, 160
STATUS_CODES = {"ok": 0, **FAILURE_CODES, "too_large": 10}


@dataclass
class Entry:
    name: str
    smiles: str | None = None
    mol: object = None  # RDKit molecule from an SDF record (None: unreadable record)


def read_library(path: Path, d) -> list[Entry]:
    if path.suffix.lower() in (".sdf", ".sd"):
        return [Entry(n, None, m) for n, m in read_sdf(path)]
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and (d.name_column not in rows[0] or d.smiles_column not in rows[0]):
        raise JobError(f"key 'docking.library' = {str(path)!r}: needs columns {d.name_column!r} and "
                       f"{d.smiles_column!r}, has {list(rows[0])}")
    return [Entry((r[d.name_column] or f"row{i}").strip(), r[d.smiles_column]) for i, r in enumerate(rows)]


@dataclass
class ScreenPlan:
    loaded: LoadedJob
    library: list[Entry]
    layout: Layout
    backend: object
    boxes: list
    receptors: list = field(default_factory=list)  # ReceptorIndex per target, loaded lazily
    maps: dict = field(default_factory=dict)

    @property
    def job(self):
        return self.loaded.job


def _pdbqt_len(d) -> int:
    return 82 * (d.max_atoms + 2 * d.max_torsions + 12)


def build_layout(loaded: LoadedJob, n: int) -> Layout:
    d = loaded.job.docking
    from kernels.docking.vina_sf import TERMS

    T, M, A = len(d.targets), d.num_modes, d.max_atoms
    L, LT, LTM = ("ligand",), ("ligand", "target"), ("ligand", "target", "mode")
    kcal = {"units": "kcal/mol"}
    v = [
        VarSpec("name", L, f"S{NAME_LEN}", {"long_name": "ligand name from the library"}),
        VarSpec("smiles", L, f"S{SMILES_LEN}", {"long_name": "canonical SMILES of the docked molecule"}),
        VarSpec("ligand_pdbqt", L, f"S{_pdbqt_len(d)}", {"long_name": "prepared ligand (meeko PDBQT, input pose)"}),
        VarSpec("n_atoms", L, "i4", {"long_name": "ligand atoms (hydrogens included)"}),
        VarSpec("n_torsions", L, "i2", {"long_name": "active torsions"}),
        VarSpec("status", LT, "i1", {"flag_values": np.array(list(STATUS_CODES.values()), dtype="i1"),
                                     "flag_meanings": " ".join(STATUS_CODES), "long_name": "docking status"}),
        VarSpec("reason", LT, f"S{REASON_LEN}", {"long_name": "failure reason (empty when ok)"}),
        VarSpec("score", LT, "f8", {**kcal, "long_name": "Vina affinity of the best pose"}),
        VarSpec("inter", LT, "f8", {**kcal, "long_name": "intermolecular energy of the best pose"}),
        VarSpec("intra", LT, "f8", {**kcal, "long_name": "intramolecular energy of the best pose"}),
        VarSpec("terms", ("ligand", "target", "term"), "f8",
                {**kcal, "long_name": "weighted intermolecular terms of the best pose (Vina, one term at a time)"}),
        VarSpec("mode_score", LTM, "f8", {**kcal, "long_name": "Vina affinity of each kept pose"}),
        VarSpec("pose", ("ligand", "target", "mode", "atom", "xyz"), "f4",
                {"units": "angstrom", "long_name": "pose coordinates, atoms in ligand_pdbqt order"}),
    ]
    coords = {"target": np.array([t.name.encode() for t in d.targets], dtype="S64"),
              "term": np.array([t.encode() for t in TERMS], dtype="S16"),
              "xyz": np.array([b"x", b"y", b"z"], dtype="S1")}
    return Layout(n, np.zeros(0), "", v, loaded.job.job.chunk_size,
                  dims={"target": T, "term": len(TERMS), "mode": M, "atom": A, "xyz": 3}, coords=coords,
                  row_dim="ligand")


def _box(loaded: LoadedJob, t):
    from kernels.docking.vina_sf import Box

    if t.autobox_ligand is None:
        return Box(tuple(t.center), tuple(t.size))
    from .dock_cli import load_ligand_any

    ref = load_ligand_any(str(loaded.resolve(t.autobox_ligand)))
    h = ref.xyz[ref.heavy]
    return Box(tuple(map(float, (h.min(0) + h.max(0)) / 2)), tuple(map(float, h.max(0) - h.min(0) + t.autobox_add)))


def make_plan(loaded: LoadedJob, local_rank: int = 0) -> ScreenPlan:
    from ..backend import resolve

    req = loaded.job.job.backend
    if req == "numpy":
        raise JobError(f"{loaded.path}: key 'job.backend' = {req!r}: the docking search runs on the 'cpu' (C/OpenMP) "
                       "or 'cuda' backend; use 'cpu', 'cuda' or 'auto'")
    backend = resolve(req, local_rank)
    if backend.name == "numpy":  # auto found neither a GPU nor a compiler: say why the cpu backend cannot run
        backend = resolve("cpu", local_rank)
    d = loaded.job.docking
    lib = read_library(loaded.resolve(d.library), d)
    if not lib:
        raise JobError(f"{loaded.path}: key 'docking.library' = {d.library!r}: no ligands")
    boxes = [_box(loaded, t) for t in d.targets]
    return ScreenPlan(loaded, lib, build_layout(loaded, len(lib)), backend, boxes)


def _receptor(plan: ScreenPlan, k: int):
    from kernels.docking.pdbqt import PdbqtError, read_receptor
    from kernels.docking.vina_sf import ReceptorIndex

    if not plan.receptors:
        plan.receptors = [None] * len(plan.job.docking.targets)
    if plan.receptors[k] is None:
        t = plan.job.docking.targets[k]
        try:
            rec = read_receptor(plan.loaded.resolve(t.receptor).read_text(), t.receptor)
        except PdbqtError as e:
            raise JobError(f"key 'docking.targets[{k}].receptor': {e}") from None
        plan.receptors[k] = ReceptorIndex(rec.xyz, rec.xs)
    return plan.receptors[k]


def _maps(plan: ScreenPlan, k: int, types):
    """Receptor maps are shared by every ligand of a target (computed once per rank and type)."""
    from kernels.docking.search import compute_maps

    have = plan.maps.get(k)
    need = {int(t) for t in types}
    if have is None or not need <= set(have.types.tolist()):
        # all common ligand types at once, so later ligands rarely trigger a recomputation
        common = set(range(16)) | need | (set(have.types.tolist()) if have is not None else set())
        plan.maps[k] = compute_maps(_receptor(plan, k), sorted(common), plan.boxes[k])
    return plan.maps[k]


def _stream(seed: int, *keys: int) -> int:
    h = hashlib.sha256(repr((int(seed),) + tuple(int(k) for k in keys)).encode()).digest()
    return int.from_bytes(h[:8], "little")


def compute_chunk(plan: ScreenPlan, cid: int, check=None) -> dict[str, np.ndarray]:
    from kernels.docking.pdbqt import PdbqtError, read_ligand

    lay, d, seed = plan.layout, plan.job.docking, plan.job.job.seed
    lo, hi = lay.chunk_bounds(cid)
    m, T, A = hi - lo, len(d.targets), d.max_atoms
    out = {v.path: np.zeros(tuple(m if x == "ligand" else lay.dims[x] for x in v.dims), dtype=v.dtype)
           for v in lay.vars}
    for key in ("score", "inter", "intra", "terms", "mode_score", "pose"):
        out[key][...] = np.nan
    docked = []  # (row, ligand index, Ligand) of the prepared ligands
    for r, i in enumerate(range(lo, hi)):
        if check is not None:
            check()
        e = plan.library[i]
        out["name"][r] = e.name.encode("utf-8", "replace")[:NAME_LEN]
        try:
            if e.smiles is not None:
                prep = prepare_smiles(e.smiles, e.name, seed=_stream(seed, i) % 2**31,
                                      largest_fragment=d.largest_fragment, max_torsions=d.max_torsions)
            else:
                prep = prepare_mol3d(e.mol, e.name, max_torsions=d.max_torsions, largest_fragment=d.largest_fragment)
            lig = read_ligand(prep.pdbqt, e.name)
            if len(lig.xs) > A:
                raise LigandFailure("too_large", f"{len(lig.xs)} atoms > max_atoms = {A}")
            if len(prep.pdbqt) > _pdbqt_len(d):
                raise LigandFailure("too_large", f"PDBQT of {len(prep.pdbqt)} bytes exceeds the stored width")
        except (LigandFailure, PdbqtError) as ex:
            code = getattr(ex, "code", "preparation_failed")
            out["status"][r, :] = STATUS_CODES[code]
            out["reason"][r, :] = str(ex).encode("utf-8", "replace")[:REASON_LEN]
            log.info("ligand %d %r failed: %s", i, e.name, ex)
            continue
        out["smiles"][r] = prep.smiles.encode()[:SMILES_LEN]
        out["ligand_pdbqt"][r] = prep.pdbqt.encode()
        out["n_atoms"][r] = len(lig.xs)
        out["n_torsions"][r] = lig.n_torsions
        docked.append((r, i, lig))
    for k in range(T):
        if check is not None:
            check()
        if docked:
            _dock_target(plan, k, docked, out)
    return out


def _dock_target(plan: ScreenPlan, k: int, docked, out) -> None:
    """The chunk's prepared ligands against target k: one batched search (all chains of all
    ligands in one call on the plan's backend, sharing the target's maps). Streams are keyed by
    (seed, ligand, target), so a ligand's result is the same in any batch; if the batch raises, the
    ligands are re-docked one at a time so that only the failing one is recorded as failed."""
    from kernels.docking import search

    d, seed, M = plan.job.docking, plan.job.job.seed, plan.job.docking.num_modes
    failures = (RuntimeError, ValueError, FloatingPointError)

    def dock(group):
        ligs = [lig for _, _, lig in group]
        maps = _maps(plan, k, np.concatenate([lig.xs[lig.heavy] for lig in ligs]))
        return search.dock_batch(_receptor(plan, k), ligs, plan.boxes[k], d.exhaustiveness,
                                 [_stream(seed, i, k) for _, i, _ in group], n_poses=M, min_rmsd=d.min_rmsd,
                                 energy_range=d.energy_range, steps_scale=d.steps_scale, maps=maps,
                                 backend=plan.backend.name)

    try:
        results = dock(docked)
    except failures as ex:
        log.info("target %d: batch of %d ligands failed (%s); docking them one at a time", k, len(docked), ex)
        results = []
        for one in docked:
            try:
                results.append(dock([one])[0])
            except failures as ex1:
                results.append(ex1)
    for (r, _, lig), res in zip(docked, results):
        if not isinstance(res, Exception) and not res[0]:
            res = RuntimeError("no pose found")
        if isinstance(res, Exception):
            out["status"][r, k] = STATUS_CODES["docking_failed"]
            out["reason"][r, k] = str(res).encode()[:REASON_LEN]
            continue
        poses = res[0]
        s = poses[0].score
        out["score"][r, k], out["inter"][r, k], out["intra"][r, k] = s.total, s.inter, s.intra
        out["terms"][r, k] = s.terms
        for j, p in enumerate(poses[:M]):
            out["mode_score"][r, k, j] = p.score.total
            out["pose"][r, k, j, : len(lig.xs)] = p.xyz


def manifest(plan: ScreenPlan) -> dict:
    d = plan.job.docking
    h = hashlib.sha256(plan.loaded.resolve(d.library).read_bytes())
    for t in d.targets:
        h.update(plan.loaded.resolve(t.receptor).read_bytes())
    return {"format": "twin-dock/1", "job_name": plan.job.job.name, "job_sha256": plan.loaded.sha256,
            "inputs_sha256": h.hexdigest(), "n_ligands": len(plan.library),
            "n_patients": len(plan.library),  # rows, under the key `twin status` reads
            "chunk_size": plan.layout.chunk_size,
            "vars": [[v.path, list(v.dims), v.dtype] for v in plan.layout.vars]}


def run(loaded: LoadedJob, run_dir: Path, comm, quiet: bool = False) -> int:
    """Run or resume a docking screen on every rank of `comm` (the cohort runner's start-up)."""
    from ..runner import StopFlag, _Progress, _setup_rank_log, local_rank_of, open_attempt, plan_on_every_rank

    stop = StopFlag()
    stop.install()
    plan = plan_on_every_rank(comm, lambda: make_plan(loaded, local_rank_of(comm)))
    with open_attempt(run_dir, comm, loaded, plan.layout, lambda: manifest(plan), plan.backend,
                      plan.job.job.seed) as (attempt, done, prov):
        return _run_chunks(plan, loaded, run_dir, comm, quiet, stop, attempt, done, prov, _Progress, _setup_rank_log)


def _run_chunks(plan, loaded, run_dir, comm, quiet, stop, attempt, done, prov, Progress, setup_log) -> int:
    rank, size = comm.rank, comm.size
    lay = plan.layout
    setup_log(run_dir, rank)
    todo = [c for c in range(lay.n_chunks()) if c not in done]
    log.info("docking attempt %d: %d chunks, %d done, %d to run on %d ranks", attempt, lay.n_chunks(), len(done),
             len(todo), size)
    from ..runner import process_chunks

    progress = Progress(rank == 0 and not quiet, lay, len(done), size)
    t0, c0 = time.time(), time.process_time()
    all_entries, interrupted, _ = process_chunks(lay, lambda cid: compute_chunk(plan, cid, check=stop.check), run_dir,
                                                 comm, stop, attempt, done, on_done=progress.update if rank == 0 else None)
    progress.close()
    cpu = comm.gather(time.process_time() - c0, root=0) if size > 1 else [time.process_time() - c0]
    code = EXIT_INTERRUPTED if interrupted else EXIT_OK
    if rank == 0:
        if interrupted or len(all_entries) < lay.n_chunks():
            provenance.append_record(run_dir, {"event": "interrupted", "attempt": attempt,
                                               "chunks_done": len(all_entries), "time": provenance.utc_now()})
            print(f"twin: interrupted: {len(all_entries)}/{lay.n_chunks()} chunks saved in {run_dir}; rerun the same "
                  f"command to resume (exit {EXIT_INTERRUPTED})", file=sys.stderr if quiet else sys.stdout, flush=True)
            code = EXIT_INTERRUPTED
        else:
            digest = provenance.result_digest(all_entries)
            head = provenance.append_record(run_dir, {"event": "complete", "attempt": attempt,
                                                      "chunks_done": len(all_entries), "result_sha256": digest,
                                                      "time": provenance.utc_now()})
            n_new = sum(lay.chunk_bounds(c)[1] - lay.chunk_bounds(c)[0] for c in all_entries if c not in done)
            attrs = {**prov, "kind": "docking", "job_toml": loaded.text, "job_sha256": loaded.sha256,
                     "job_name": plan.job.job.name, "backend": plan.backend.name, "device": plan.backend.device,
                     "ranks": size, "seed": plan.job.job.seed, "attempt": attempt, "end_time": provenance.utc_now(),
                     "n_ligands": lay.n_patients,
                     "targets": [t.name for t in plan.job.docking.targets], "result_sha256": digest,
                     "audit_head": head, "scoring_function": "AutoDock Vina 1.2 (vina)",
                     "ligands_per_cpu_second": (n_new / sum(cpu)) if n_new and sum(cpu) > 0 else None}
            path = store.build_master(run_dir, lay, all_entries, attrs)
            import h5py

            with h5py.File(path, "r") as f:
                st = f["status"][()]
            n_failed = int((st != 0).any(axis=1).sum())
            el = time.time() - t0
            print(f"twin: wrote {path} ({lay.n_patients} ligands x {len(plan.job.docking.targets)} targets, "
                  f"{n_failed} ligands with failures; {el:.1f} s, {sum(cpu):.1f} CPU s)",
                  file=sys.stderr if quiet else sys.stdout, flush=True)
    return comm.bcast(code, root=0)
