"""The docking screen job: failure records, HDF5 store, MPI rank-independence, resume, analysis."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine.config import load_job
from engine.parallel import SerialComm
from tests.helpers import MPIEXEC, mpi_cmd, run_twin

D = Path(__file__).parent / "data" / "docking"
ENV = {"OMP_NUM_THREADS": "1"}


def job(tmp_path: Path, library: str, name="scr", chunk=2, targets=1, steps=0.05, exh=2) -> Path:
    tg = f'''
[[docking.targets]]
name = "strep"
receptor = "{D / '1stp_protein.pdbqt'}"
autobox_ligand = "{D / '1stp_ligand.pdbqt'}"
autobox_add = 12.0
'''
    if targets > 1:
        tg += f'''
[[docking.targets]]
name = "abl1"
receptor = "{D / '1iep_receptor.pdbqt'}"
center = [15.190, 53.903, 16.917]
size = [20.0, 20.0, 20.0]
'''
    p = tmp_path / f"{name}.toml"
    p.write_text(f'''[job]
name = "{name}"
seed = 11
chunk_size = {chunk}
backend = "cpu"

[docking]
library = "{library}"
exhaustiveness = {exh}
num_modes = 2
steps_scale = {steps}
{tg}''')
    return p


def datasets(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()].tobytes()) if isinstance(o, h5py.Dataset) else None)
    return out


def test_bad_ligand_corpus_gives_one_failure_record_each(tmp_path):
    """Every bad entry is recorded with its reason and the good ligands around it are docked."""
    lib = tmp_path / "lib.csv"
    bad = (D / "bad_ligands.csv").read_text().strip().splitlines()
    lib.write_text("name,smiles\nparacetamol,CC(=O)NC1=CC=C(O)C=C1\n" + "\n".join(bad[1:]) + "\nphenol,OC1=CC=CC=C1\n")
    r = run_twin("run", job(tmp_path, str(lib)), "-o", tmp_path / "run", "-q", env=ENV)
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "run" / "RUN.h5", "r") as f:
        names = [n.decode() for n in f["name"][()]]
        status = f["status"][:, 0]
        reason = [x.decode() for x in f["reason"][:, 0]]
        score = f["score"][:, 0]
        meanings = f["status"].attrs["flag_meanings"].split()
        codes = dict(zip(meanings, f["status"].attrs["flag_values"]))
    want = {"bad_smiles": "invalid_structure", "boronic_acid": "unsupported_element", "no_heavy_atoms": "no_heavy_atoms",
            "too_flexible": "too_flexible", "salt": "disconnected", "wrong_charge": "implausible_charge",
            "pentavalent_n": "invalid_structure"}
    for i, n in enumerate(names):
        if n in want:
            assert status[i] == codes[want[n]], (n, reason[i])
            assert reason[i] and np.isnan(score[i])
        else:
            assert status[i] == 0 and reason[i] == "" and -9 < score[i] < -3, (n, score[i])
    assert sorted(n for n in names if n in want) == sorted(want)
    assert "boron" in reason[names.index("boronic_acid")] or "B" in reason[names.index("boronic_acid")]


def test_screen_result_opens_in_xarray_and_analysis_runs(tmp_path):
    import xarray as xr

    r = run_twin("run", job(tmp_path, str(D / "library_sample.csv"), targets=2, chunk=4), "-o", tmp_path / "run", "-q",
                 env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    ds = xr.open_dataset(tmp_path / "run" / "RUN.h5", engine="h5netcdf")
    assert dict(ds["score"].sizes) == {"ligand": 8, "target": 2}
    assert ds["pose"].dims == ("ligand", "target", "mode", "atom", "xyz")
    assert [t.decode() for t in ds["target"].values] == ["strep", "abl1"]
    ok = ds["status"].values == 0
    assert ok.all()
    # the stored best score is the first kept mode, and per-term energies are finite
    assert np.allclose(ds["mode_score"].values[:, :, 0], ds["score"].values)
    assert np.isfinite(ds["terms"].values).all()
    ds.close()
    s = run_twin("summary", tmp_path / "run")
    assert s.returncode == 0, s.stderr
    assert "top 8 hits for strep" in s.stdout and "ligands per CPU-second" in s.stdout
    rp = run_twin("report", tmp_path / "run", "-o", tmp_path / "rep")
    assert rp.returncode == 0 and (tmp_path / "rep" / "score_distribution_abl1.png").stat().st_size > 1000
    po = run_twin("poses", tmp_path / "run", "-o", tmp_path / "poses", "--top", "2", "--format", "sdf")
    assert po.returncode == 0, po.stderr
    files = sorted((tmp_path / "poses").glob("*.sdf"))
    assert len(files) == 4 and all("$$$$" in f.read_text() for f in files)
    # an exported pose rescored by the NumPy reference equals the stored affinity
    from kernels.docking import vina_sf as sf
    from kernels.docking.pdbqt import read_ligand, read_receptor

    po = run_twin("poses", tmp_path / "run", "-o", tmp_path / "pq", "--top", "1")
    f = sorted((tmp_path / "pq").glob("abl1_001_*.pdbqt"))[0]
    text = f.read_text()
    best = float(text.splitlines()[1].split()[3])
    lig = read_ligand(text.split("ENDMDL")[0])
    rec = read_receptor((D / "1iep_receptor.pdbqt").read_text())
    s = sf.score_pose(sf.ReceptorIndex(rec.xyz, rec.xs), lig.xyz, lig.xs, lig.pairs, lig.num_tors,
                      sf.Box((15.190, 53.903, 16.917), (20, 20, 20)))
    # the stored pose is written to 3 decimals (PDBQT), so 0.01 kcal/mol
    assert s.inter / (1 + sf.W_ROT * lig.num_tors) == pytest.approx(best, abs=0.01)


@pytest.mark.mpi
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed")
def test_mpi_two_ranks_equal_one_rank(tmp_path):
    lib = str(D / "library_sample.csv")
    j = job(tmp_path, lib, chunk=1)
    r1 = run_twin("run", j, "-o", tmp_path / "one", "-q", env=ENV, timeout=600)
    assert r1.returncode == 0, r1.stderr
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    r2 = subprocess.run(mpi_cmd(2, "run", j, "-o", tmp_path / "two", "-q"), env=env, capture_output=True, text=True,
                        timeout=600)
    assert r2.returncode == 0, r2.stderr
    a, b = datasets(tmp_path / "one" / "RUN.h5"), datasets(tmp_path / "two" / "RUN.h5")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    with h5py.File(tmp_path / "two" / "RUN.h5", "r") as f:
        assert int(f.attrs["ranks"]) == 2


def test_kill_then_resume_equals_uninterrupted(tmp_path):
    """SIGKILL after the first journaled chunk; rerunning completes the screen with the same arrays."""
    lib = str(D / "library_sample.csv")
    j = job(tmp_path, lib, chunk=1, steps=0.1)
    ref = run_twin("run", j, "-o", tmp_path / "ref", "-q", env=ENV, timeout=600)
    assert ref.returncode == 0, ref.stderr
    from tests.helpers import TWIN

    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*TWIN, "run", str(j), "-o", str(tmp_path / "run"), "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    jdir = tmp_path / "run" / "journal"
    while time.time() - t0 < 300:
        lines = sum(len(f.read_text().splitlines()) for f in jdir.glob("*.jsonl")) if jdir.exists() else 0
        if lines >= 1 or proc.poll() is not None:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "screen finished before it could be killed: make it slower"
    assert not (tmp_path / "run" / "RUN.h5").exists()
    r = run_twin("run", j, "-o", tmp_path / "run", "-q", env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    a, b = datasets(tmp_path / "ref" / "RUN.h5"), datasets(tmp_path / "run" / "RUN.h5")
    assert [k for k in a if a[k] != b[k]] == []


def test_bad_docking_job_key_is_named(tmp_path):
    p = job(tmp_path, str(D / "library_sample.csv"))
    p.write_text(p.read_text().replace("exhaustiveness = 2", "exhaustiveness = 0"))
    r = run_twin("run", p, "-o", tmp_path / "x")
    assert r.returncode == 2
    assert "key 'docking.exhaustiveness' = 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    p.write_text(p.read_text().replace("exhaustiveness = 0", "exhaustiveness = 2").replace("library_sample.csv", "nope.csv"))
    r = run_twin("run", p, "-o", tmp_path / "x")
    assert r.returncode == 2 and "key 'docking.library'" in r.stderr and "file not found" in r.stderr


def test_serial_api_matches_cli(tmp_path):
    """engine.docking.screen.run with a serial communicator writes the same result as the CLI."""
    from engine.docking.screen import run

    lib = tmp_path / "lib.csv"
    lib.write_text("name,smiles\nphenol,OC1=CC=CC=C1\nsalt,CC(=O)[O-].[Na+]\n")
    j = job(tmp_path, str(lib))
    assert run(load_job(j), tmp_path / "api", SerialComm(), quiet=True) == 0
    r = run_twin("run", j, "-o", tmp_path / "cli", "-q", env=ENV)
    assert r.returncode == 0
    a, b = datasets(tmp_path / "api" / "RUN.h5"), datasets(tmp_path / "cli" / "RUN.h5")
    assert [k for k in a if a[k] != b[k]] == []
