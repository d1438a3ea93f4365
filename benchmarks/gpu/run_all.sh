#!/usr/bin/env bash
# One call on a GPU machine: check every CUDA kernel against the NumPy reference, then time the
# ensemble cases (Lorenz, UVA/Padova, PK) on the GPU next to Diffrax (JAX) and torchdiffeq on the
# same GPU, the batched docking search against single-core AutoDock Vina, and the tissue
# monodomain kernels (Niederer slab at dx 0.1 mm). Results go to $OUT
# (default benchmarks/gpu/out): device.txt, parity.txt, ensemble_gpu.json/.txt,
# docking_gpu.json/.txt. Copy the tables into benchmarks/RESULTS.md with the device name.
#
#   bash benchmarks/gpu/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/gpu/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/device.txt"
# every generated CUDA kernel vs the NumPy reference (tests skip nothing when a device is present)
python3 -m pytest -q -p no:cacheprovider tests/test_kernel_parity.py tests/test_float32.py -k "cuda or float32" -rs \
  2>&1 | tee "$OUT/parity.txt"
# docking: maps and the batched Monte Carlo + BFGS search on cuda vs cpu (maps, chains, redock RMSD)
python3 -m pytest -q -p no:cacheprovider tests/test_docking_cuda.py tests/test_docking_batch.py -rs \
  2>&1 | tee -a "$OUT/parity.txt"
# tissue: the monodomain kernels (exact and lookup-table cell step) on cuda vs cpu
python3 -m pytest -q -p no:cacheprovider tests/test_tissue.py -k cuda -rs 2>&1 | tee -a "$OUT/parity.txt"
# tissue over 2 MPI ranks on cuda (halo planes staged through the host unless MPI is CUDA-aware)
python3 -m pytest -q -p no:cacheprovider tests/test_tissue_mpi.py -k cuda -rs 2>&1 | tee -a "$OUT/parity.txt"
# throughput: ours (cuda) vs Diffrax (JAX on the GPU) vs torchdiffeq (batched, GPU)
python3 benchmarks/ensemble.py --backend cuda --torchdiffeq -o "$OUT/ensemble_gpu.json" 2>&1 | tee "$OUT/ensemble_gpu.txt"
# docking: cuda vs cpu best scores, 1stp redock on the GPU, ligands/s vs single-core AutoDock Vina
python3 benchmarks/docking_gpu.py --backend cuda -o "$OUT/docking_gpu.json" 2>&1 | tee "$OUT/docking_gpu.txt"
# tissue: Niederer slab at dx 0.1 mm, 100 ms on the GPU (target <= 2 s), tables and exact
python3 benchmarks/tissue_gpu.py -o "$OUT/tissue_gpu.json" 2>&1 | tee "$OUT/tissue_gpu.txt"
python3 benchmarks/tissue_gpu.py --exact -o "$OUT/tissue_gpu_exact.json" 2>&1 | tee -a "$OUT/tissue_gpu.txt"
