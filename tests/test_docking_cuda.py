"""The docking CUDA kernels compile with NVRTC (as CuPy's RawModule does) and, on a GPU, match C."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from tests.test_kernel_parity import NVRTC, _gpu

SRC = Path(__file__).resolve().parents[1] / "kernels" / "docking" / "vina_maps.cu"


@pytest.mark.skipif(NVRTC is None, reason="NVRTC (nvidia-cuda-nvrtc) not installed")
def test_docking_cuda_source_compiles_with_nvrtc():
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), SRC.read_bytes(), b"vina_maps.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * 2)(b"--std=c++14", b"-arch=compute_90")
    rc = NVRTC.nvrtcCompileProgram(prog, 2, opts)
    n = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    size = ctypes.c_size_t()
    if rc == 0:
        NVRTC.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetPTX(prog, ptx)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode()
    text = ptx.value.decode()
    assert ".entry vina_maps_cuda" in text and ".entry vina_score_maps_cuda" in text


@pytest.mark.skipif(not _gpu(), reason="no CUDA device (CuPy) on this machine")
def test_cuda_maps_match_cpu():
    from kernels.docking import search
    from kernels.docking import vina_sf as sf
    from kernels.docking.pdbqt import read_ligand, read_receptor

    D = Path(__file__).parent / "data" / "docking"
    rec = read_receptor((D / "1stp_protein.pdbqt").read_text())
    lig = read_ligand((D / "1stp_ligand.pdbqt").read_text())
    h = lig.xyz[lig.heavy]
    box = sf.Box(tuple((h.min(0) + h.max(0)) / 2), tuple(h.max(0) - h.min(0) + 12.0))
    R = sf.ReceptorIndex(rec.xyz, rec.xs)
    cpu = search.compute_maps(R, lig.xs[lig.heavy], box)
    gpu = search.compute_maps_cuda(R, lig.xs[lig.heavy], box)
    np.testing.assert_allclose(gpu.data, cpu.data, rtol=0, atol=1e-9)  # same sums, order may differ
