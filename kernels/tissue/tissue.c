/* twin-engine monodomain tissue kernels (appended after the generated cell model).
 *
 * Grid: a rank's slab padded by one ghost layer on every side, C order [x][y][z] (z fastest), so
 * the x-halo planes MPI exchanges are contiguous. Ghost voxels have mask 0; the x ghosts of an
 * interior slab hold the neighbour rank's planes. One OpenMP iteration or one CUDA thread per voxel.
 *
 * Step (Godunov splitting): cell  Vs = cell_step(Y, V) (Rush-Larsen for gating states, forward
 * Euler for the rest, Y updated in place except V); then diffusion  V' = Vs + dt * div(D grad Vs)
 * (possibly in sub-steps, ping-ponging); then track  (threshold crossings of V between steps).
 *
 * Boundary: mirror (even reflection) at the mask surface. A face neighbour outside the mask is
 * replaced by the voxel on the opposite side; the flux through such a face is minus the flux through
 * the opposite face (zero normal flux half way), which for a box is the usual second-order
 * vertex-centred Neumann condition.
 */
#ifndef TISSUE_NO_MAIN_INCLUDES
#endif

DEVICE real tissue_rl_update(real y, real f, real b, real dt) {
    /* exact for f = a + b y with a, b frozen; b = 0 is forward Euler (same formula as integrator.c) */
    real z = b * dt;
    real phi = r_fabs(z) < 1e-8 ? 1.0 + 0.5 * z : r_expm1(z) / z;
    return y + dt * (f * phi);
}

/* @@FUSED_STEP@@ */

DEVICE void tissue_cell_one(twin_idx c, twin_idx n, const unsigned char* mask, real* Y, real* Vs,
                            const real* p, const signed char* stim_id, const real* stim_amp, real t, real dt,
                            int vidx, const real* lut, real lut_v0, real lut_idv, int lut_rows) {
    if (!mask[c]) { Vs[c] = Y[(twin_idx)vidx * n + c]; return; }
    real y[NS], yn[NS], u[NIN];
    int i;
    for (i = 0; i < NS; ++i) y[i] = Y[(twin_idx)i * n + c];
    for (i = 0; i < NIN; ++i) u[i] = 0;
    if (stim_id[c] >= 0) u[0] = stim_amp[stim_id[c]];
    /* Rush-Larsen for gating states (b != 0), forward Euler else; V-only terms from the lookup
     * table when one is given (lut_rows > 0, kernels/tissue/tables.py) */
    if (lut_rows > 0) model_rl_step_lut(t, y, p, u, dt, yn, lut, lut_v0, lut_idv, lut_rows);
    else model_rl_step(t, y, p, u, dt, yn);
    for (i = 0; i < NS; ++i) {
        if (i == vidx) Vs[c] = yn[i]; else Y[(twin_idx)i * n + c] = yn[i];
    }
}

/* ---------------------------------------------------------------- diffusion stencil */
#define IDX(i, j, k) (((twin_idx)(i) * ny + (j)) * nz + (k))

DEVICE real tissue_lap_one(int i, int j, int k, int ny, int nz, const unsigned char* mask, const real* V,
                           const real* Dxx, const real* Dyy, const real* Dzz, const real* Dxy, const real* Dxz,
                           const real* Dyz, real hx, real hy, real hz, int cross) {
    const twin_idx c = IDX(i, j, k);
    const real vc = V[c];
    const int o[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
    const real h[3] = {hx, hy, hz};
    /* in[a][s]: face neighbour on side s (0: -, 1: +) along axis a is tissue */
    int in[3][2];
    int a, b, s;
    for (a = 0; a < 3; ++a)
        for (s = 0; s < 2; ++s) {
            int sg = s ? 1 : -1;
            in[a][s] = mask[IDX(i + sg * o[a][0], j + sg * o[a][1], k + sg * o[a][2])] != 0;
        }
    real lap = 0;
    for (a = 0; a < 3; ++a) {
        real F[2] = {0, 0};
        for (s = 0; s < 2; ++s) {
            if (!in[a][s]) continue;
            int sg = s ? 1 : -1;
            twin_idx nb = IDX(i + sg * o[a][0], j + sg * o[a][1], k + sg * o[a][2]);
            const real* Daa = a == 0 ? Dxx : (a == 1 ? Dyy : Dzz);
            /* flux in the +a direction through the face between c and its neighbour */
            real f = 0.5 * (Daa[c] + Daa[nb]) * (s ? (V[nb] - vc) : (vc - V[nb])) / h[a];
            if (cross) {
                for (b = 0; b < 3; ++b) {
                    if (b == a) continue;
                    const real* Dab = (a + b == 1) ? Dxy : ((a + b == 2) ? Dxz : Dyz);
                    /* d V / d b at the face: mean of the central differences at c and at nb, each
                     * mirrored where the b-neighbour is outside the tissue */
                    real g = 0;
                    int q;
                    for (q = 0; q < 2; ++q) {
                        int ii = i + (q ? sg * o[a][0] : 0), jj = j + (q ? sg * o[a][1] : 0),
                            kk = k + (q ? sg * o[a][2] : 0);
                        twin_idx cp = IDX(ii + o[b][0], jj + o[b][1], kk + o[b][2]);
                        twin_idx cm = IDX(ii - o[b][0], jj - o[b][1], kk - o[b][2]);
                        twin_idx cc = IDX(ii, jj, kk);
                        real vp = mask[cp] ? V[cp] : (mask[cm] ? V[cm] : V[cc]);
                        real vm = mask[cm] ? V[cm] : (mask[cp] ? V[cp] : V[cc]);
                        g += (vp - vm) / (4 * h[b]);
                    }
                    f += 0.5 * (Dab[c] + Dab[nb]) * g;
                }
            }
            F[s] = f;
        }
        if (in[a][1] && !in[a][0]) F[0] = -F[1];
        if (in[a][0] && !in[a][1]) F[1] = -F[0];
        lap += (F[1] - F[0]) / h[a];
    }
    return lap;
}

/* The same operator without cross terms (fibres along a grid axis, or isotropic): the 7-point
 * stencil written out with strides; the same fluxes as tissue_lap_one up to rounding (the
 * constant factors 0.5/h^2 are applied once, not per face: ~3x faster). */
DEVICE real tissue_lap7_one(twin_idx c, twin_idx sx, twin_idx sy, const unsigned char* mask, const real* V,
                            const real* Dxx, const real* Dyy, const real* Dzz, real hx, real hy, real hz) {
    const real vc = V[c];
    real lap = 0;
#define TWIN_AXIS(S, D, H)                                                                       \
    {                                                                                            \
        const int ip = mask[c + (S)] != 0, im = mask[c - (S)] != 0;                              \
        real Fp = ip ? (D[c] + D[c + (S)]) * (V[c + (S)] - vc) : 0;                              \
        real Fm = im ? (D[c] + D[c - (S)]) * (vc - V[c - (S)]) : 0;                              \
        if (ip && !im) Fm = -Fp;                                                                 \
        if (im && !ip) Fp = -Fm;                                                                 \
        lap += (Fp - Fm) * (0.5 / ((H) * (H)));                                                  \
    }
    TWIN_AXIS(sx, Dxx, hx)
    TWIN_AXIS(sy, Dyy, hy)
    TWIN_AXIS(1, Dzz, hz)
#undef TWIN_AXIS
    return lap;
}

/* ---------------------------------------------------------------- threshold tracking */
DEVICE void tissue_track_one(twin_idx c, const unsigned char* mask, const real* V, real* Vprev, real* act_first,
                             real* act_last, real* repol, real* apd, int* n_act, real t0, real dt, real thr_act,
                             real thr_rep) {
    if (!mask[c]) return;
    real v0 = Vprev[c], v1 = V[c];
    if (v0 < thr_act && v1 >= thr_act) {
        real tc = t0 + dt * (thr_act - v0) / (v1 - v0);
        if (!(act_first[c] == act_first[c])) act_first[c] = tc; /* NaN: not yet activated */
        act_last[c] = tc;
        n_act[c] += 1;
    }
    if (v0 >= thr_rep && v1 < thr_rep && act_last[c] == act_last[c]) {
        real tc = t0 + dt * (v0 - thr_rep) / (v0 - v1);
        if (!(repol[c] >= act_last[c])) { repol[c] = tc; apd[c] = tc - act_last[c]; }
    }
    Vprev[c] = v1;
}

#ifdef KERNEL_CUDA
extern "C" __global__ void tissue_cell(twin_idx n, const unsigned char* mask, real* Y, real* Vs, const real* p,
                                       const signed char* stim_id, const real* stim_amp, real t, real dt, int vidx,
                                       const real* lut, real lut_v0, real lut_idv, int lut_rows) {
    twin_idx c = (twin_idx)blockIdx.x * blockDim.x + threadIdx.x;
    if (c < n) tissue_cell_one(c, n, mask, Y, Vs, p, stim_id, stim_amp, t, dt, vidx, lut, lut_v0, lut_idv, lut_rows);
}

extern "C" __global__ void tissue_diffuse(int nx, int ny, int nz, const unsigned char* mask, const real* V, real* Vout,
                                          const real* Dxx, const real* Dyy, const real* Dzz, const real* Dxy,
                                          const real* Dxz, const real* Dyz, real hx, real hy, real hz, real dt,
                                          int cross) {
    twin_idx c = (twin_idx)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= (twin_idx)nx * ny * nz) return;
    int k = (int)(c % nz), j = (int)((c / nz) % ny), i = (int)(c / ((twin_idx)ny * nz));
    if (i < 1 || i > nx - 2 || j < 1 || j > ny - 2 || k < 1 || k > nz - 2 || !mask[c]) { Vout[c] = V[c]; return; }
    Vout[c] = V[c] + dt * (cross ? tissue_lap_one(i, j, k, ny, nz, mask, V, Dxx, Dyy, Dzz, Dxy, Dxz, Dyz, hx, hy, hz, 1)
                                 : tissue_lap7_one(c, (twin_idx)ny * nz, nz, mask, V, Dxx, Dyy, Dzz, hx, hy, hz));
}

extern "C" __global__ void tissue_track(twin_idx n, const unsigned char* mask, const real* V, real* Vprev,
                                        real* act_first, real* act_last, real* repol, real* apd, int* n_act,
                                        real t0, real dt, real thr_act, real thr_rep) {
    twin_idx c = (twin_idx)blockIdx.x * blockDim.x + threadIdx.x;
    if (c < n) tissue_track_one(c, mask, V, Vprev, act_first, act_last, repol, apd, n_act, t0, dt, thr_act, thr_rep);
}
#else
#ifdef _OPENMP
#include <omp.h>
#endif
/* Threads only for grids big enough to pay for a parallel region (~1-10 us each, three per step):
 * a small sheet or a test slab runs on one thread, and is not held up at every barrier by a
 * thread waiting for a core that other work is using. */
#define TISSUE_OMP(n_) ((n_) >= 32768)
void tissue_cell(twin_idx n, const unsigned char* mask, real* Y, real* Vs, const real* p, const signed char* stim_id,
                 const real* stim_amp, real t, real dt, int vidx, const real* lut, real lut_v0, real lut_idv,
                 int lut_rows, int threads) {
    twin_idx c;
    if (lut_rows > 0 && TISSUE_LUT_SIMD && vidx == TISSUE_LUT_VIDX) {
        /* blocks of voxels through the vectorised table step; the few voxels it leaves (outside the
         * tissue or the table's V range) get the exact scalar step */
        const twin_idx B = 512, nb = (n + B - 1) / B;
        twin_idx b;
#pragma omp parallel for schedule(static) num_threads(threads) if (TISSUE_OMP(n))
        for (b = 0; b < nb; ++b) {
            const twin_idx c0 = b * B, c1 = c0 + B < n ? c0 + B : n;
            twin_idx cc;
            tissue_cell_lut_range(c0, c1, n, mask, Y, Vs, p, stim_id, stim_amp, t, dt, lut, lut_v0, lut_idv, lut_rows);
            for (cc = c0; cc < c1; ++cc) {
                const real q = (Y[(twin_idx)vidx * n + cc] - lut_v0) * lut_idv;
                if (!mask[cc] || !(q >= 0 && q < (real)(lut_rows - 1)))
                    tissue_cell_one(cc, n, mask, Y, Vs, p, stim_id, stim_amp, t, dt, vidx, lut, lut_v0, lut_idv, 0);
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (TISSUE_OMP(n))
    for (c = 0; c < n; ++c)
        tissue_cell_one(c, n, mask, Y, Vs, p, stim_id, stim_amp, t, dt, vidx, lut, lut_v0, lut_idv, lut_rows);
}

/* The 7-point operator along one z-row of interior voxels as an `omp simd` loop: tissue_lap7_one
 * with its branches written as selects (neighbour loads are always in the padded slab), the same
 * operations in the same order, so the same bits. */
static void tissue_diffuse7_row(twin_idx c0, int len, twin_idx sx, twin_idx sy, const unsigned char* mask,
                                const real* V, real* Vout, const real* Dxx, const real* Dyy, const real* Dzz,
                                real hx, real hy, real hz, real dt) {
    int q;
#pragma omp simd
    for (q = 0; q < len; ++q) {
        const twin_idx c = c0 + q;
        const real vc = V[c];
        real lap = 0;
#define TWIN_AXIS_V(S, D, H)                                                                     \
    {                                                                                            \
        const int ip = mask[c + (S)] != 0, im = mask[c - (S)] != 0;                              \
        const real fp = (D[c] + D[c + (S)]) * (V[c + (S)] - vc);                                 \
        const real fm = (D[c] + D[c - (S)]) * (vc - V[c - (S)]);                                 \
        const real Fp0 = ip ? fp : 0, Fm0 = im ? fm : 0;                                          \
        const real Fm = (ip & !im) ? -Fp0 : Fm0;                                                  \
        const real Fp = (im & !ip) ? -Fm0 : Fp0;                                                  \
        lap += (Fp - Fm) * (0.5 / ((H) * (H)));                                                  \
    }
        TWIN_AXIS_V(sx, Dxx, hx)
        TWIN_AXIS_V(sy, Dyy, hy)
        TWIN_AXIS_V(1, Dzz, hz)
#undef TWIN_AXIS_V
        Vout[c] = mask[c] ? vc + dt * lap : vc;
    }
}

void tissue_diffuse(int nx, int ny, int nz, const unsigned char* mask, const real* V, real* Vout, const real* Dxx,
                    const real* Dyy, const real* Dzz, const real* Dxy, const real* Dxz, const real* Dyz, real hx,
                    real hy, real hz, real dt, int cross, int threads) {
    const twin_idx n = (twin_idx)nx * ny * nz;
    int i;
    if (!cross) {
#pragma omp parallel for schedule(static) num_threads(threads) if (TISSUE_OMP(n))
        for (i = 0; i < nx; ++i) {
            int j;
            for (j = 0; j < ny; ++j) {
                const twin_idx r = IDX(i, j, 0);
                if (i < 1 || i > nx - 2 || j < 1 || j > ny - 2 || nz < 3) {
                    int k;
                    for (k = 0; k < nz; ++k) Vout[r + k] = V[r + k];
                    continue;
                }
                Vout[r] = V[r];
                Vout[r + nz - 1] = V[r + nz - 1];
                tissue_diffuse7_row(r + 1, nz - 2, (twin_idx)ny * nz, nz, mask, V, Vout, Dxx, Dyy, Dzz, hx, hy, hz, dt);
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (TISSUE_OMP(n))
    for (i = 0; i < nx; ++i) {
        int j, k;
        for (j = 0; j < ny; ++j)
            for (k = 0; k < nz; ++k) {
                twin_idx c = IDX(i, j, k);
                if (i < 1 || i > nx - 2 || j < 1 || j > ny - 2 || k < 1 || k > nz - 2 || !mask[c]) {
                    Vout[c] = V[c];
                    continue;
                }
                Vout[c] = V[c] + dt * (cross ? tissue_lap_one(i, j, k, ny, nz, mask, V, Dxx, Dyy, Dzz, Dxy, Dxz, Dyz,
                                                              hx, hy, hz, 1)
                                             : tissue_lap7_one(c, (twin_idx)ny * nz, nz, mask, V, Dxx, Dyy, Dzz, hx,
                                                               hy, hz));
            }
    }
}

void tissue_track(twin_idx n, const unsigned char* mask, const real* V, real* Vprev, real* act_first, real* act_last,
                  real* repol, real* apd, int* n_act, real t0, real dt, real thr_act, real thr_rep, int threads) {
    twin_idx c;
#pragma omp parallel for schedule(static) num_threads(threads) if (TISSUE_OMP(n))
    for (c = 0; c < n; ++c)
        tissue_track_one(c, mask, V, Vprev, act_first, act_last, repol, apd, n_act, t0, dt, thr_act, thr_rep);
}
#endif
