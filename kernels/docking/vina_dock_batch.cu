// AutoDock Vina Monte Carlo + BFGS docking of a packed batch of ligands x chains on the GPU
// (CuPy RawModule / NVRTC, or nvcc). One thread per chain runs the chain code of vina_chain.h,
// the same text the `cpu` backend compiles; all ligands read the receptor maps in global memory.
// Work arrays come from a global-memory pool (one slice per chain), so per-thread state in
// registers/local memory is only scalars and a few 3-vectors.
#include "vina_chain.h"

extern "C" __global__ void vina_dock_batch_cuda(long long n_chains, int exh, const int* npts, const double* begin,
                                                const double* end, double slope, const double* maps,
                                                const long* lig_off, const int* lig_steps, const u64* lig_seed,
                                                const int* atom_map, const int* atom_body, const double* local,
                                                const int* parent, const double* origin_rel, const double* axis_ref,
                                                const double* root_origin, const int* pairs, const int* pair_tab,
                                                const double* smooth, const double* dor, int ntab, double min_rmsd,
                                                int keep, double* E, double* C, double* X, int* n_kept,
                                                long* n_evals, double* pool) {
    long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n_chains) return;
    batch_chain((long)c, exh, npts, begin, end, slope, maps, lig_off, lig_steps, lig_seed, atom_map, atom_body, local,
                parent, origin_rel, axis_ref, root_origin, pairs, pair_tab, smooth, dor, ntab, min_rmsd, keep, E, C,
                X, n_kept, n_evals, pool);
}
