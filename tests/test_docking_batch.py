"""The batched docking search (many ligands × chains in one call): one chain source for the `cpu`
and `cuda` backends (kernels/docking/vina_chain.h), its CPU parity, its CUDA build, and on a GPU
the cuda results against the cpu ones."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.docking.poses import symmetric_rmsd
from kernels.docking import batch, search
from kernels.docking import vina_sf as sf
from kernels.docking.pdbqt import read_ligand, read_receptor
from tests.test_kernel_parity import NVRTC, _gpu

D = Path(__file__).parent / "data" / "docking"
NAMES = ("1stp", "1iep", "3ce3")


@pytest.fixture(scope="module")
def setup():
    rec = read_receptor((D / "1stp_protein.pdbqt").read_text())
    R = sf.ReceptorIndex(rec.xyz, rec.xs)
    ligs = {n: read_ligand((D / f"{n}_ligand.pdbqt").read_text()) for n in NAMES}
    h = ligs["1stp"].xyz[ligs["1stp"].heavy]
    box = sf.Box(tuple((h.min(0) + h.max(0)) / 2), tuple(h.max(0) - h.min(0) + 12.0))
    maps = search.compute_maps(R, np.concatenate([lg.xs[lg.heavy] for lg in ligs.values()]), box, 1)
    return R, ligs, box, maps


def _run(setup, order, threads, steps=25, exh=3):
    _, ligs, _, maps = setup
    models = [search.LigandModel(ligs[n], maps) for n in order]
    seeds = [1000 + NAMES.index(n) for n in order]
    res = batch.search_chains(models, seeds, [(steps, search.vina_steps(ligs[n])[1]) for n in order], exh, 1.0,
                              "cpu", threads)
    return dict(zip(order, res))


def test_batch_is_bit_identical_to_one_ligand_calls(setup):
    """A ligand's chains give the same bits alone (the per-ligand path: search.dock packs a batch
    of one) as inside a mixed batch in another order on 2 threads: streams are keyed by (ligand
    seed, chain) and each chain touches only its own slice of the pool and outputs. Exact
    equality: the same compiled chain code runs on the same inputs, so any difference is a bug."""
    single = {n: _run(setup, [n], 1)[n] for n in NAMES}
    mixed = _run(setup, ["3ce3", "1stp", "1iep"], 2)
    for n in NAMES:
        a, b = single[n], mixed[n]
        assert (a.kept > 0).all() and np.array_equal(a.kept, b.kept), n
        for k in range(len(a.kept)):
            np.testing.assert_array_equal(a.E[k, :a.kept[k]], b.E[k, :b.kept[k]])
        np.testing.assert_array_equal(a.C, b.C)
        np.testing.assert_array_equal(a.X, b.X)
        assert np.isfinite(a.E[:, 0]).all()
        # kept poses are sorted by energy and their coordinates are the conformations' coordinates
        for k in range(len(a.kept)):
            e = a.E[k, :a.kept[k]]
            assert (np.diff(e) >= 0).all()
    # chains of one ligand differ (their streams are independent)
    assert len(set(single["1stp"].E[:, 0].tolist())) == 3


def test_kept_coordinates_match_conformations(setup):
    """The coordinates a chain stores are those of its stored conformation (checked through the
    independent vina_eval entry point, to 1e-9 Å: the same set_conf arithmetic, exact in practice)."""
    _, ligs, _, maps = setup
    r = _run(setup, ["1iep"], 1)["1iep"]
    m = search.LigandModel(ligs["1iep"], maps)
    _, _, x = m.evaluate(r.C[0, :r.kept[0]])
    np.testing.assert_allclose(x, r.X[0, :r.kept[0]], rtol=0, atol=1e-9)


def test_dock_batch_matches_dock(setup):
    """search.dock_batch (the screen's call) and search.dock (twin dock's) give the same poses."""
    R, ligs, box, maps = setup
    both = search.dock_batch(R, [ligs["1stp"], ligs["3ce3"]], box, 2, [7, 8], n_poses=3, steps_scale=0.01, maps=maps,
                             threads=2)
    one, _ = search.dock(R, ligs["3ce3"], box, exhaustiveness=2, seed=8, n_poses=3, steps_scale=0.01, maps=maps,
                         threads=1)
    assert [p.score.total for p in both[1][0]] == [p.score.total for p in one]
    np.testing.assert_array_equal(both[1][0][0].xyz, one[0].xyz)


def test_batch_rejects_mixed_maps(setup):
    R, ligs, box, maps = setup
    other = search.compute_maps(R, ligs["1stp"].xs[ligs["1stp"].heavy], box, 1)
    models = [search.LigandModel(ligs["1stp"], maps), search.LigandModel(ligs["1stp"], other)]
    with pytest.raises(ValueError, match="same receptor maps"):
        batch.Batch(models, [1, 2], [(1, 1), (1, 1)], 2, 1.0)


CUDA_SRC = batch.with_header(batch.CUDA_SOURCE)


@pytest.mark.skipif(NVRTC is None, reason="NVRTC (nvidia-cuda-nvrtc) not installed")
def test_batch_cuda_source_compiles_with_nvrtc():
    """The exact text and options CuPy's RawModule gets on a GPU machine."""
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), CUDA_SRC.encode(), b"vina_dock_batch.cu", 0, None, None) == 0
    opts = [o.encode() for o in batch.CUDA_OPTIONS] + [b"-arch=compute_90"]
    rc = NVRTC.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if rc == 0:
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode()
    assert b".entry vina_dock_batch_cuda" in ptx


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_batch_cuda_source_compiles_with_nvcc_for_sm90(tmp_path):
    """nvcc builds the kernel for Hopper with no register spills (one thread per chain keeps only
    scalars and 3-vectors in registers; arrays live in the global-memory pool)."""
    src = tmp_path / "vina_dock_batch.cu"
    src.write_text(CUDA_SRC)
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", *batch.CUDA_OPTIONS, "-Xptxas", "-v", "-o",
                        str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = r.stderr[r.stderr.index("Compiling entry function 'vina_dock_batch_cuda'"):]
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    assert regs <= 255 and spills.groups() == ("0", "0"), info[:400]


@pytest.mark.skipif(not _gpu(), reason="no CUDA device (CuPy) on this machine")
def test_cuda_batch_matches_cpu(setup):  # pragma: no cover - needs a GPU
    """Same chains on the GPU. Both builds avoid fused multiply-add, but CUDA's sin/cos/exp/log
    may round differently from glibc in the last bit, and a Monte Carlo chain amplifies that, so
    chains diverge: the comparison is statistical. (1) After one Monte Carlo step (random start,
    BFGS, refinement) the best energy of at least half of the 24 chains agrees to 1e-6 kcal/mol.
    Calibration on the CPU with every sin/cos/exp/log result moved by one ulp (a worse case than
    CUDA's libm, which differs from glibc only for some arguments): 71 % of the chains agree after
    one step, 58 % after three, 17 % after fifty. (2) Redocking biotin (1stp) on the GPU at the CI
    effort of test_redock_biotin_within_2A (4 chains, 30 % of Vina's steps), seeds 1-4: at least 3
    top poses within 2 Å of the crystal pose and every best score below -5.5 kcal/mol. The cpu
    backend at this effort, seeds 1-6: all 6 within 2 Å (0.43-1.85 Å), best scores -7.44 to -5.90
    (the crystal pose scores -6.725), so a GPU search of the same quality passes."""
    R, ligs, box, maps = setup
    models = [search.LigandModel(ligs[n], maps) for n in NAMES]
    seeds = [1000 + i for i in range(len(NAMES))]
    steps = [(1, search.vina_steps(ligs[n])[1]) for n in NAMES]
    cpu = batch.search_chains(models, seeds, steps, 8, 1.0, "cpu", 2)
    gpu = batch.search_chains(models, seeds, steps, 8, 1.0, "cuda")
    a = np.concatenate([c.E[:, 0] for c in cpu])
    b = np.concatenate([g.E[:, 0] for g in gpu])
    assert np.mean(np.abs(a - b) <= 1e-6) >= 0.5, (a, b)
    lig = ligs["1stp"]
    top = [search.dock(R, lig, box, exhaustiveness=4, seed=s, steps_scale=0.3, maps=maps, backend="cuda")[0][0]
           for s in (1, 2, 3, 4)]
    rmsd = [symmetric_rmsd(lig, p.xyz, lig.xyz) for p in top]
    assert sum(r < 2.0 for r in rmsd) >= 3, rmsd
    assert all(p.score.total < -5.5 for p in top), [p.score.total for p in top]


def test_screen_chunks_are_batches_and_chunk_size_does_not_matter(tmp_path):
    """A screen docks each chunk's ligands as one batch per target; results (scores and poses) are
    identical with chunks of 1 (per-ligand) and of 3 (one batch), including a failed ligand's
    record, because each ligand's streams are keyed by (seed, ligand, target)."""
    import h5py

    from tests.helpers import run_twin
    from tests.test_docking_screen import ENV, datasets, job

    lib = tmp_path / "lib.csv"
    lib.write_text("name,smiles\nphenol,OC1=CC=CC=C1\nboronic,OB(O)c1ccccc1\nparacetamol,CC(=O)NC1=CC=C(O)C=C1\n")
    runs = {}
    for chunk in (1, 3):
        r = run_twin("run", job(tmp_path, str(lib), name=f"c{chunk}", chunk=chunk), "-o", tmp_path / f"c{chunk}", "-q",
                     env=ENV)
        assert r.returncode == 0, r.stderr
        runs[chunk] = datasets(tmp_path / f"c{chunk}" / "RUN.h5")
    for key in ("score", "mode_score", "pose", "status", "reason", "terms"):
        assert runs[1][key] == runs[3][key], key
    with h5py.File(tmp_path / "c3" / "RUN.h5", "r") as f:
        st, sc = f["status"][:, 0], f["score"][:, 0]
        assert f.attrs["backend"] == "cpu"
    assert st.tolist() == [0, st[1], 0] and st[1] != 0 and np.isfinite(sc[[0, 2]]).all()


@pytest.mark.skipif(_gpu(), reason="checks the no-GPU error")
def test_cuda_backend_without_gpu_is_one_line_error(tmp_path):
    """backend = "cuda" goes through engine.backend: no GPU is an error naming the key, never a
    silent fallback to the cpu backend; the same for `twin dock --backend cuda`."""
    from tests.helpers import run_twin
    from tests.test_docking_screen import job

    p = job(tmp_path, str(D / "library_sample.csv"))
    p.write_text(p.read_text().replace('backend = "cpu"', 'backend = "cuda"'))
    r = run_twin("run", p, "-o", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert "key 'job.backend' = 'cuda': cannot run here" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    r = run_twin("dock", "--receptor", D / "1stp_protein.pdbqt", "--ligand", D / "1stp_ligand.pdbqt",
                 "--autobox_ligand", D / "1stp_ligand.pdbqt", "--backend", "cuda")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("twin: error: --backend = 'cuda': cannot run here"), r.stderr


def test_batch_reproduces_the_previous_per_ligand_kernel(setup):
    """The chain code moved from vina_search.c's per-ligand vina_dock into vina_chain.h with its
    arithmetic order unchanged: the batched path reproduces the old kernel's kept energies and
    best conformations bit for bit (reference made by the old kernel; tests/data/docking/SOURCES.md).
    Exact equality: same operations in the same order through the same libm; a difference means
    the order changed (or, on another machine, that its libm rounds sin/cos/exp/log differently)."""
    import json

    R, ligs, box, _ = setup
    ref = json.loads((D / "vina_dock_reference.json").read_text())
    maps = search.compute_maps(R, range(16), box, 1)  # the reference used maps for all 16 XS types
    models = [search.LigandModel(ligs[n], maps) for n in ref]
    res = batch.search_chains(models, [ref[n]["seed"] for n in ref],
                              [(40, search.vina_steps(ligs[n])[1]) for n in ref], 3, 1.0, "cpu", 2)
    for n, r in zip(ref, res):
        for k in range(3):
            assert r.E[k, :r.kept[k]].tolist() == ref[n]["E"][k], (n, k)
            assert r.C[k, 0].tolist() == ref[n]["C0"][k], (n, k)


def test_twin_dock_backend_value_is_checked_first():
    from tests.helpers import run_twin

    r = run_twin("dock", "--receptor", D / "1stp_protein.pdbqt", "--ligand", D / "1stp_ligand.pdbqt",
                 "--autobox_ligand", D / "1stp_ligand.pdbqt", "--backend", "gpu")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "twin: error: --backend = 'gpu': allowed: cpu, cuda, auto"


def test_failing_batch_is_redocked_per_ligand(tmp_path, monkeypatch):
    """If a chunk's batched search raises (here: forced for batches holding 'phenol', since no real
    input makes the kernel raise), the chunk's ligands are docked one at a time: only that ligand
    is recorded as docking_failed with the reason, the others get the results of a clean run."""
    from engine.config import load_job
    from engine.docking import screen
    from tests.test_docking_screen import job

    lib = tmp_path / "lib.csv"
    lib.write_text("name,smiles\nphenol,OC1=CC=CC=C1\nparacetamol,CC(=O)NC1=CC=C(O)C=C1\n")
    plan = screen.make_plan(load_job(job(tmp_path, str(lib), chunk=2)))
    clean = screen.compute_chunk(plan, 0)
    real = search.dock_batch
    n_phenol = int(clean["n_atoms"][0])  # phenol is the smaller molecule
    assert n_phenol != clean["n_atoms"][1]

    def failing(rec, ligs, *a, **k):
        if any(len(lg.xs) == n_phenol for lg in ligs):
            raise FloatingPointError("forced failure")
        return real(rec, ligs, *a, **k)

    monkeypatch.setattr(search, "dock_batch", failing)
    out = screen.compute_chunk(plan, 0)
    assert out["status"][:, 0].tolist() == [screen.STATUS_CODES["docking_failed"], 0]
    assert out["reason"][0, 0] == b"forced failure" and np.isnan(out["score"][0, 0])
    assert out["score"][1, 0] == clean["score"][1, 0]
    np.testing.assert_array_equal(out["pose"][1], clean["pose"][1])
