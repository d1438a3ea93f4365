// AutoDock Vina grid maps and batched map scoring on the GPU (CuPy RawModule / NVRTC).
// Same arithmetic as vina_search.c: maps are sums of Vina's r^2 table (32 points per A^2) over
// receptor heavy atoms within 8 A, found through a host-built cell list of 8 A cells; poses are
// scored by trilinear interpolation with Vina's curl (v = 1000) and out-of-box penalty.
// One thread per grid point; one thread per (pose, atom) for scoring. All ligands of a screen share
// the receptor's maps, as in Uni-Dock.

#define NTAB_FACTOR 32.0
#define CUTOFF_SQR 64.0

extern "C" __global__ void vina_maps_cuda(int n_types, const int* __restrict__ types, int nx, int ny, int nz,
                                          double bx, double by, double bz, double fx, double fy, double fz,
                                          double lox, double loy, double loz, int ncx, int ncy, int ncz,
                                          const int* __restrict__ cell_start, const int* __restrict__ order,
                                          const double* __restrict__ rxyz, const int* __restrict__ rxs, int n_xs,
                                          const double* __restrict__ fast, int ntab, double* __restrict__ out) {
    long nxyz = (long)nx * ny * nz;
    long g = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nxyz) return;
    int ix = (int)(g / ((long)ny * nz)), iy = (int)((g / nz) % ny), iz = (int)(g % nz);
    double p0 = bx + fx * ix, p1 = by + fy * iy, p2 = bz + fz * iz;  // f*: grid spacing (1/factor)
    double acc[32];
    for (int k = 0; k < n_types; k++) acc[k] = 0.0;
    int c0 = (int)floor((p0 - lox) / 8.0), c1 = (int)floor((p1 - loy) / 8.0), c2 = (int)floor((p2 - loz) / 8.0);
    for (int a = c0 - 1; a <= c0 + 1; a++) {
        if (a < 0 || a >= ncx) continue;
        for (int b = c1 - 1; b <= c1 + 1; b++) {
            if (b < 0 || b >= ncy) continue;
            for (int c = c2 - 1; c <= c2 + 1; c++) {
                if (c < 0 || c >= ncz) continue;
                long cell = ((long)a * ncy + b) * ncz + c;
                for (int q = cell_start[cell]; q < cell_start[cell + 1]; q++) {
                    int i = order[q];
                    double dx = rxyz[3 * i] - p0, dy = rxyz[3 * i + 1] - p1, dz = rxyz[3 * i + 2] - p2;
                    double r2 = dx * dx + dy * dy + dz * dz;
                    if (r2 <= CUTOFF_SQR) {
                        int idx = (int)(NTAB_FACTOR * r2);
                        for (int k = 0; k < n_types; k++) acc[k] += fast[((long)types[k] * n_xs + rxs[i]) * ntab + idx];
                    }
                }
            }
        }
    }
    for (int k = 0; k < n_types; k++) out[k * nxyz + g] = acc[k];
}

// e[pose] += curl(trilinear(map[atom_map[atom]], xyz[pose, atom])) + penalty, for heavy atoms
extern "C" __global__ void vina_score_maps_cuda(int n_pose, int n_atoms, const double* __restrict__ xyz,
                                                const int* __restrict__ atom_map, const double* __restrict__ maps,
                                                int nx, int ny, int nz, double bx, double by, double bz,
                                                double fx, double fy, double fz, double slope, double v,
                                                double* __restrict__ e) {
    long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long)n_pose * n_atoms) return;
    int pose = (int)(t / n_atoms), atom = (int)(t % n_atoms);
    int m = atom_map[atom];
    if (m < 0) return;
    const double* x = xyz + 3 * t;
    double b[3] = {bx, by, bz}, f[3] = {fx, fy, fz};
    int n[3] = {nx, ny, nz}, a[3];
    double s[3], penalty = 0;
    for (int i = 0; i < 3; i++) {
        s[i] = (x[i] - b[i]) * f[i];
        double dm1 = n[i] - 1;
        if (s[i] < 0) { penalty += -s[i] / f[i]; a[i] = 0; s[i] = 0; }
        else if (s[i] >= dm1) { penalty += (s[i] - dm1) / f[i]; a[i] = n[i] - 2; s[i] = 1; }
        else { a[i] = (int)s[i]; s[i] -= a[i]; }
    }
    const double* g = maps + (long)m * nx * ny * nz;
    double acc = 0;
    for (int dx = 0; dx < 2; dx++)
        for (int dy = 0; dy < 2; dy++)
            for (int dz = 0; dz < 2; dz++) {
                double w = (dx ? s[0] : 1 - s[0]) * (dy ? s[1] : 1 - s[1]) * (dz ? s[2] : 1 - s[2]);
                acc += w * g[((long)(a[0] + dx) * ny + (a[1] + dy)) * nz + (a[2] + dz)];
            }
    if (acc > 0) acc *= v / (v + acc);
    atomicAdd(e + pose, acc + slope * penalty);
}
