"""`twin dock`: one receptor × one ligand, with AutoDock Vina's options and output."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EXIT_OK, JobError

BOX_KEYS = ("center_x", "center_y", "center_z", "size_x", "size_y", "size_z")


def add_arguments(p) -> None:
    p.add_argument("--receptor", required=True, help="rigid receptor (PDBQT)")
    p.add_argument("--ligand", required=True, help="ligand: PDBQT, SDF (3-D) or a SMILES string / .smi file")
    p.add_argument("--config", help="Vina-style config file (key = value lines: center_x, size_x, exhaustiveness, ...)")
    for k in BOX_KEYS:
        p.add_argument(f"--{k}", type=float)
    p.add_argument("--autobox_ligand", help="box around this ligand file (PDBQT or SDF) plus --autobox_add")
    p.add_argument("--autobox_add", type=float, default=8.0, help="padding for --autobox_ligand (Å, total per axis)")
    p.add_argument("--exhaustiveness", type=int, default=8, help="independent Monte Carlo chains (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_modes", type=int, default=9)
    p.add_argument("--energy_range", type=float, default=3.0)
    p.add_argument("--min_rmsd", type=float, default=1.0)
    p.add_argument("--cpu", type=int, default=0, help="OpenMP threads (0: all available)")
    p.add_argument("--backend", default="cpu", help="search backend: cpu (C/OpenMP, default), cuda (GPU) or auto")
    p.add_argument("--score_only", action="store_true", help="score the input pose, print terms")
    p.add_argument("--local_only", action="store_true", help="BFGS local optimisation of the input pose")
    p.add_argument("--out", help="output poses (.pdbqt; .sdf through meeko)")
    p.add_argument("--steps_scale", type=float, default=1.0, help="fraction of Vina's Monte Carlo steps (testing)")


def _config(path: str) -> dict:
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise JobError(f"{path}:{n}: expected 'key = value', got {line!r}")
        k, v = (s.strip() for s in line.split("=", 1))
        out[k] = v
    return out


def load_ligand_any(spec: str):
    """A Ligand from a PDBQT file, the first record of an SDF, or SMILES (string or .smi)."""
    from kernels.docking.pdbqt import PdbqtError, read_ligand

    from .prepare import LigandFailure, prepare_mol3d, prepare_smiles, read_sdf

    p = Path(spec)
    try:
        if p.suffix.lower() == ".pdbqt":
            return read_ligand(p.read_text(), str(p))
        if p.suffix.lower() in (".sdf", ".mol"):
            name, mol = read_sdf(p)[0]
            return read_ligand(prepare_mol3d(mol, name).pdbqt, str(p))
        smi = p.read_text().split()[0] if p.suffix.lower() == ".smi" and p.exists() else spec
        return read_ligand(prepare_smiles(smi, "ligand").pdbqt, "ligand")
    except FileNotFoundError:
        raise JobError(f"--ligand {spec!r}: file not found") from None
    except (LigandFailure, PdbqtError) as e:
        raise JobError(f"--ligand {spec!r}: {e}") from None


def box_from(args) -> "object":
    from kernels.docking.vina_sf import Box

    vals = {k: getattr(args, k) for k in BOX_KEYS}
    if args.config:
        cfg = _config(args.config)
        for k in BOX_KEYS:
            if vals[k] is None and k in cfg:
                try:
                    vals[k] = float(cfg[k])
                except ValueError:
                    raise JobError(f"{args.config}: key '{k}' = {cfg[k]!r}: not a number") from None
        for k in ("exhaustiveness", "seed", "num_modes"):
            if k in cfg and getattr(args, k) == {"exhaustiveness": 8, "seed": 0, "num_modes": 9}[k]:
                setattr(args, k, int(cfg[k]))
    if args.autobox_ligand:
        ref = load_ligand_any(args.autobox_ligand)
        h = ref.xyz[ref.heavy]
        c = (h.min(0) + h.max(0)) / 2
        s = h.max(0) - h.min(0) + args.autobox_add
        return Box(tuple(map(float, c)), tuple(map(float, s)))
    missing = [k for k, v in vals.items() if v is None]
    if missing:
        raise JobError(f"box: missing {', '.join('--' + k for k in missing)} (or give --config / --autobox_ligand)")
    for k in BOX_KEYS[3:]:
        if vals[k] <= 0:
            raise JobError(f"--{k} = {vals[k]}: must be > 0")
    return Box((vals["center_x"], vals["center_y"], vals["center_z"]), (vals["size_x"], vals["size_y"], vals["size_z"]))


def run(args) -> int:
    from kernels.docking import search
    from kernels.docking import vina_sf as sf
    from kernels.docking.pdbqt import PdbqtError, read_receptor

    from ..backend import resolve
    from .poses import pose_sdf, rmsd_bounds, vina_out

    if args.exhaustiveness < 1:
        raise JobError(f"--exhaustiveness = {args.exhaustiveness}: must be >= 1")
    if args.backend not in ("cpu", "cuda", "auto"):
        raise JobError(f"--backend = {args.backend!r}: allowed: cpu, cuda, auto")
    try:
        backend = resolve(args.backend)
    except JobError as e:  # resolve names the job key; this is a command-line option
        raise JobError(str(e).replace("key 'job.backend'", "--backend")) from None
    if backend.name == "numpy":
        backend = resolve("cpu")
    box = box_from(args)
    try:
        rec = read_receptor(Path(args.receptor).read_text(), args.receptor)
    except FileNotFoundError:
        raise JobError(f"--receptor {args.receptor!r}: file not found") from None
    except PdbqtError as e:
        raise JobError(f"--receptor: {e}") from None
    lig = load_ligand_any(args.ligand)
    R = sf.ReceptorIndex(rec.xyz, rec.xs)
    threads = args.cpu or None
    print(f"twin dock (AutoDock Vina scoring function)\nReceptor: {args.receptor}   Ligand: {args.ligand}")
    print(f"Grid center: X {box.center[0]:.3f} Y {box.center[1]:.3f} Z {box.center[2]:.3f}")
    print(f"Grid size  : X {box.size[0]:g} Y {box.size[1]:g} Z {box.size[2]:g}")
    if args.score_only or args.local_only:
        xyz = lig.xyz
        if args.local_only:
            m = search.LigandModel(lig, search.compute_maps(R, lig.xs[lig.heavy], box, threads))
            _, _, x = m.local_opt(m.identity_conf())
            xyz = x[0]
        s = search.score_with_terms(R, xyz, lig, box)
        print(f"Estimated Free Energy of Binding   : {s.total:.3f} (kcal/mol) [=(1)+(2)+(3)-(4)]")
        print(f"(1) Final Intermolecular Energy    : {s.inter:.3f} (kcal/mol)")
        print(f"(2) Final Total Internal Energy    : {s.intra:.3f} (kcal/mol)")
        print(f"(3) Torsional Free Energy          : {s.torsional:.3f} (kcal/mol)")
        print(f"(4) Unbound System's Energy        : {s.intra if not args.local_only else s.intra:.3f} (kcal/mol)")
        for name, e in zip(sf.TERMS, s.terms):
            print(f"    {name:<14s}: {e:9.4f} (kcal/mol, weighted, intermolecular)")
        if args.out and args.local_only:
            Path(args.out).write_text(vina_out(lig, [search.Pose(xyz, s)], [(0.0, 0.0)]))
        return EXIT_OK
    t0, c0 = time.time(), time.process_time()
    poses, st = search.dock(R, lig, box, exhaustiveness=args.exhaustiveness, seed=args.seed, n_poses=args.num_modes,
                            min_rmsd=args.min_rmsd, energy_range=args.energy_range, steps_scale=args.steps_scale,
                            threads=threads, backend=backend.name)
    print(f"Performing docking (random seed: {args.seed}) ... done ({time.time() - t0:.1f} s wall, "
          f"{st['chains']} chains x {st['global_steps']} steps)")
    print("\nmode |   affinity | dist from best mode\n     | (kcal/mol) | rmsd l.b.| rmsd u.b.\n"
          "-----+------------+----------+----------")
    rm = [rmsd_bounds(lig, p.xyz, poses[0].xyz) for p in poses]
    for i, (p, (lb, ub)) in enumerate(zip(poses, rm), start=1):
        print(f"{i:>4d} {p.score.total:>12.3f} {lb:>10.3f} {ub:>10.3f}")
    if args.out:
        text = vina_out(lig, poses, rm)
        Path(args.out).write_text(pose_sdf(text) if args.out.lower().endswith(".sdf") else text)
    sys.stdout.flush()
    return EXIT_OK
