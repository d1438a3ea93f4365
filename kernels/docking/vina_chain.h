/* AutoDock Vina Monte Carlo + BFGS search: one chain, device-portable.
 *
 * The same text compiles as C99 (+ OpenMP in vina_search.c, `cpu` backend) and as CUDA
 * (vina_dock_batch.cu through NVRTC / nvcc, `cuda` backend), so the GPU runs exactly the
 * algorithm the CPU tests verify. Inside a chain: no malloc, no libc beyond math; every work
 * array is a slice of a caller-provided pool (chain_pool_doubles() per chain).
 *
 * Chain (Vina monte_carlo::operator()): random start in the box, mutate one of position /
 * orientation / one torsion, BFGS local optimisation, Metropolis acceptance at T = 1.2, promising
 * poses refined and kept if they differ by > min_rmsd from the chain's other poses. Energies:
 * trilinear map interpolation (+ out-of-box penalty) and intramolecular pairs from the smooth
 * table, each curled as Vina does. Each chain has its own random stream keyed by (seed, chain),
 * the seed already keyed by the ligand, so results do not depend on batch or thread count.
 */
#ifndef VINA_CHAIN_H
#define VINA_CHAIN_H
#ifdef __CUDACC__
#define DEVICE __device__ static inline
#else
#include <math.h>
#define DEVICE static inline
#if defined(__GNUC__) && !defined(__clang__)
/* GCC's SLP vectoriser changes the rounding of quat_increment depending on where it is inlined,
 * so the same chain would give different bits in different builds; without it every build
 * computes the source's operation order (as -O0 and nvcc do). Measured cost: see RESULTS.md. */
#pragma GCC optimize("no-tree-slp-vectorize")
#endif
#endif
typedef unsigned long long u64; /* no stdint.h: NVRTC has no system headers */

#define NTAB_FACTOR 32.0
#define CUTOFF_SQR 64.0
#define EPS 2.22044604925031308e-16
#define PI 3.14159265358979323846

/* element loops in place of memcpy/memset (same values, no libc on the device) */
DEVICE void copy_d(double *dst, const double *src, long n) {
    for (long i = 0; i < n; i++) dst[i] = src[i];
}
DEVICE void zero_d(double *dst, long n) {
    for (long i = 0; i < n; i++) dst[i] = 0.0;
}

/* ------------------------------------------------------------------ random numbers */
typedef struct { u64 s[4]; } rng_t;
DEVICE u64 splitmix(u64 *x) {
    u64 z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
DEVICE void rng_seed(rng_t *r, u64 seed, u64 stream) {
    u64 x = seed ^ (0xD1B54A32D192ED03ull * (stream + 1));
    for (int i = 0; i < 4; i++) r->s[i] = splitmix(&x);
}
DEVICE u64 rotl(u64 x, int k) { return (x << k) | (x >> (64 - k)); }
DEVICE u64 rng_next(rng_t *r) { /* xoshiro256** */
    u64 *s = r->s, res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return res;
}
DEVICE double uni(rng_t *r, double a, double b) { return a + (b - a) * ((rng_next(r) >> 11) * (1.0 / 9007199254740992.0)); }
DEVICE double gauss(rng_t *r) {
    double u = uni(r, 1e-300, 1.0), v = uni(r, 0.0, 1.0);
    return sqrt(-2.0 * log(u)) * cos(2.0 * PI * v);
}
DEVICE void in_sphere(rng_t *r, double *v) {
    for (;;) {
        v[0] = uni(r, -1, 1); v[1] = uni(r, -1, 1); v[2] = uni(r, -1, 1);
        if (v[0] * v[0] + v[1] * v[1] + v[2] * v[2] < 1) return;
    }
}

/* ------------------------------------------------------------------ geometry */
DEVICE void quat_to_mat(const double *q, double *m) {
    double w = q[0], x = q[1], y = q[2], z = q[3];
    m[0] = 1 - 2 * (y * y + z * z); m[1] = 2 * (x * y - w * z); m[2] = 2 * (x * z + w * y);
    m[3] = 2 * (x * y + w * z); m[4] = 1 - 2 * (x * x + z * z); m[5] = 2 * (y * z - w * x);
    m[6] = 2 * (x * z - w * y); m[7] = 2 * (y * z + w * x); m[8] = 1 - 2 * (x * x + y * y);
}
DEVICE void quat_increment(double *q, const double *rot) { /* q <- quat(rot) * q, normalised */
    double a = sqrt(rot[0] * rot[0] + rot[1] * rot[1] + rot[2] * rot[2]);
    if (a < EPS) return;
    double s = sin(a / 2) / a, dq[4] = {cos(a / 2), rot[0] * s, rot[1] * s, rot[2] * s}, o[4];
    o[0] = dq[0] * q[0] - dq[1] * q[1] - dq[2] * q[2] - dq[3] * q[3];
    o[1] = dq[0] * q[1] + dq[1] * q[0] + dq[2] * q[3] - dq[3] * q[2];
    o[2] = dq[0] * q[2] - dq[1] * q[3] + dq[2] * q[0] + dq[3] * q[1];
    o[3] = dq[0] * q[3] + dq[1] * q[2] - dq[2] * q[1] + dq[3] * q[0];
    double n = sqrt(o[0] * o[0] + o[1] * o[1] + o[2] * o[2] + o[3] * o[3]);
    for (int i = 0; i < 4; i++) q[i] = o[i] / n;
}
DEVICE void axis_angle(const double *u, double t, double *m) {
    double c = cos(t), s = sin(t), C = 1 - c, x = u[0], y = u[1], z = u[2];
    m[0] = c + x * x * C; m[1] = x * y * C - z * s; m[2] = x * z * C + y * s;
    m[3] = y * x * C + z * s; m[4] = c + y * y * C; m[5] = y * z * C - x * s;
    m[6] = z * x * C - y * s; m[7] = z * y * C + x * s; m[8] = c + z * z * C;
}
DEVICE void matmul(const double *a, const double *b, double *o) {
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) o[3 * i + j] = a[3 * i] * b[j] + a[3 * i + 1] * b[3 + j] + a[3 * i + 2] * b[6 + j];
}
DEVICE void matvec(const double *m, const double *v, double *o) {
    for (int i = 0; i < 3; i++) o[i] = m[3 * i] * v[0] + m[3 * i + 1] * v[1] + m[3 * i + 2] * v[2];
}
DEVICE double normalize_angle(double x) {
    if (!isfinite(x)) return 0.0; /* a diverged line-search trial; its energy rejects it */
    if (x > PI || x < -PI) x = remainder(x, 2 * PI);
    return x;
}

/* ------------------------------------------------------------------ problem */
typedef struct {
    /* maps */
    int npts[3];
    double begin[3], factor[3], factor_inv[3], slope;
    const double *maps; /* [n_maps][nx*ny*nz] */
    /* ligand */
    int n_atoms, n_bodies, n_pairs, ntab, n_heavy;
    const int *atom_map, *atom_body, *parent, *pairs, *pair_tab;
    const double *local, *origin_rel, *axis_ref, *smooth, *dor, *root_origin;
    /* explicit receptor atoms (Vina's non_cache, used to refine final poses); NULL: use maps */
    const double *rxyz, *rsmooth, *rdor;
    const int *rxs, *atom_xs, *cell_start, *cell_order;
    int n_rec, n_xs, nc[3];
    double clo[3], bend[3];
} problem;

typedef struct {
    double *x;     /* world coords n_atoms*3 */
    double *R;     /* body rotations n_bodies*9 */
    double *O;     /* body origins n_bodies*3 */
    double *g;     /* dE/dx */
    double *F, *T; /* subtree force/torque */
} work;

/* conf layout: pos[3], quat[4], tors[n_bodies-1]; change layout: pos[3], rot[3], tors[...] */
DEVICE void set_conf(const problem *P, const double *c, work *w) {
    quat_to_mat(c + 3, w->R);
    copy_d(w->O, c, 3);
    for (int b = 1; b < P->n_bodies; b++) {
        int p = P->parent[b];
        double Rt[9], off[3];
        axis_angle(P->axis_ref + 3 * b, c[7 + b - 1], Rt);
        matmul(w->R + 9 * p, Rt, w->R + 9 * b);
        matvec(w->R + 9 * p, P->origin_rel + 3 * b, off);
        for (int d = 0; d < 3; d++) w->O[3 * b + d] = w->O[3 * p + d] + off[d];
    }
    for (int i = 0; i < P->n_atoms; i++) {
        int b = P->atom_body[i];
        double v[3];
        matvec(w->R + 9 * b, P->local + 3 * i, v);
        for (int d = 0; d < 3; d++) w->x[3 * i + d] = w->O[3 * b + d] + v[d];
    }
}

DEVICE double grid_eval(const problem *P, int m, const double *loc, double v, double *deriv) {
    double s[3], miss[3] = {0, 0, 0};
    int region[3], a[3];
    for (int i = 0; i < 3; i++) {
        s[i] = (loc[i] - P->begin[i]) * P->factor[i];
        double dm1 = P->npts[i] - 1;
        if (s[i] < 0) { miss[i] = -s[i]; region[i] = -1; a[i] = 0; s[i] = 0; }
        else if (s[i] >= dm1) { miss[i] = s[i] - dm1; region[i] = 1; a[i] = P->npts[i] - 2; s[i] = 1; }
        else { region[i] = 0; a[i] = (int)s[i]; s[i] -= a[i]; }
    }
    double penalty = P->slope * (miss[0] * P->factor_inv[0] + miss[1] * P->factor_inv[1] + miss[2] * P->factor_inv[2]);
    long ny = P->npts[1], nz = P->npts[2];
    const double *g = P->maps + (long)m * P->npts[0] * ny * nz;
#define GV(X, Y, Z) g[((long)(X) * ny + (Y)) * nz + (Z)]
    int x0 = a[0], y0 = a[1], z0 = a[2];
    double f000 = GV(x0, y0, z0), f100 = GV(x0 + 1, y0, z0), f010 = GV(x0, y0 + 1, z0), f110 = GV(x0 + 1, y0 + 1, z0);
    double f001 = GV(x0, y0, z0 + 1), f101 = GV(x0 + 1, y0, z0 + 1), f011 = GV(x0, y0 + 1, z0 + 1), f111 = GV(x0 + 1, y0 + 1, z0 + 1);
#undef GV
    double x = s[0], y = s[1], z = s[2], mx = 1 - x, my = 1 - y, mz = 1 - z;
    double f = f000 * mx * my * mz + f100 * x * my * mz + f010 * mx * y * mz + f110 * x * y * mz +
               f001 * mx * my * z + f101 * x * my * z + f011 * mx * y * z + f111 * x * y * z;
    double gr[3];
    gr[0] = -f000 * my * mz + f100 * my * mz - f010 * y * mz + f110 * y * mz - f001 * my * z + f101 * my * z - f011 * y * z + f111 * y * z;
    gr[1] = -f000 * mx * mz - f100 * x * mz + f010 * mx * mz + f110 * x * mz - f001 * mx * z - f101 * x * z + f011 * mx * z + f111 * x * z;
    gr[2] = -f000 * mx * my - f100 * x * my - f010 * mx * y - f110 * x * y + f001 * mx * my + f101 * x * my + f011 * mx * y + f111 * x * y;
    if (f > 0) {
        double t = v / (v + f);
        f *= t;
        for (int i = 0; i < 3; i++) gr[i] *= t * t;
    }
    for (int i = 0; i < 3; i++) deriv[i] = P->factor[i] * (region[i] == 0 ? gr[i] : 0) + P->slope * region[i];
    return f + penalty;
}

/* one ligand atom against the receptor atoms within 8 A (Vina non_cache::eval_deriv): the atom is
 * moved onto the box if outside (penalty slope per A), pair energies and derivatives interpolated
 * from the smooth table, the atom's sum curled */
DEVICE double explicit_eval(const problem *P, int i, const double *x, double v, double *deriv) {
    double a[3], pen = 0, pd[3] = {0, 0, 0};
    for (int d = 0; d < 3; d++) {
        a[d] = x[d];
        if (x[d] < P->begin[d]) { a[d] = P->begin[d]; pen += P->begin[d] - x[d]; pd[d] = -P->slope; }
        else if (x[d] > P->bend[d]) { a[d] = P->bend[d]; pen += x[d] - P->bend[d]; pd[d] = P->slope; }
    }
    int t1 = P->atom_xs[i], c0[3];
    for (int d = 0; d < 3; d++) c0[d] = (int)floor((a[d] - P->clo[d]) / 8.0);
    double e = 0, g[3] = {0, 0, 0};
    for (int cx = c0[0] - 1; cx <= c0[0] + 1; cx++) {
        if (cx < 0 || cx >= P->nc[0]) continue;
        for (int cy = c0[1] - 1; cy <= c0[1] + 1; cy++) {
            if (cy < 0 || cy >= P->nc[1]) continue;
            for (int cz = c0[2] - 1; cz <= c0[2] + 1; cz++) {
                if (cz < 0 || cz >= P->nc[2]) continue;
                long cell = ((long)cx * P->nc[1] + cy) * P->nc[2] + cz;
                for (int q = P->cell_start[cell]; q < P->cell_start[cell + 1]; q++) {
                    int j = P->cell_order[q];
                    double r[3] = {a[0] - P->rxyz[3 * j], a[1] - P->rxyz[3 * j + 1], a[2] - P->rxyz[3 * j + 2]};
                    double r2 = r[0] * r[0] + r[1] * r[1] + r[2] * r[2];
                    if (r2 >= CUTOFF_SQR) continue;
                    long off = ((long)t1 * P->n_xs + P->rxs[j]) * P->ntab;
                    double rf = NTAB_FACTOR * r2;
                    int i1 = (int)rf;
                    double rem = rf - i1;
                    const double *sm = P->rsmooth + off, *dr = P->rdor + off;
                    e += sm[i1] + rem * (sm[i1 + 1] - sm[i1]);
                    double dor = dr[i1] + rem * (dr[i1 + 1] - dr[i1]);
                    for (int d = 0; d < 3; d++) g[d] += dor * r[d];
                }
            }
        }
    }
    if (e > 0) {
        double t = v / (v + e);
        e *= t;
        for (int d = 0; d < 3; d++) g[d] *= t * t;
    }
    for (int d = 0; d < 3; d++) deriv[d] = g[d] + pd[d];
    return e + P->slope * pen;
}

/* energy (inter from maps + intra) and gradient in change space */
DEVICE double eval_deriv(const problem *P, const double *c, double v, work *w, double *grad) {
    set_conf(P, c, w);
    int n = P->n_atoms;
    double e = 0;
    zero_d(w->g, 3 * n);
    for (int i = 0; i < n; i++) {
        if (P->atom_map[i] < 0) continue;
        if (P->rxyz) e += explicit_eval(P, i, w->x + 3 * i, v, w->g + 3 * i);
        else e += grid_eval(P, P->atom_map[i], w->x + 3 * i, v, w->g + 3 * i);
    }
    for (int k = 0; k < P->n_pairs; k++) {
        int a = P->pairs[2 * k], b = P->pairs[2 * k + 1];
        double r[3] = {w->x[3 * b] - w->x[3 * a], w->x[3 * b + 1] - w->x[3 * a + 1], w->x[3 * b + 2] - w->x[3 * a + 2]};
        double r2 = r[0] * r[0] + r[1] * r[1] + r[2] * r[2];
        if (r2 >= CUTOFF_SQR) continue;
        double rf = NTAB_FACTOR * r2;
        int i1 = (int)rf;
        double rem = rf - i1;
        const double *sm = P->smooth + (long)P->pair_tab[k] * P->ntab, *dr = P->dor + (long)P->pair_tab[k] * P->ntab;
        double ee = sm[i1] + rem * (sm[i1 + 1] - sm[i1]);
        double dor = dr[i1] + rem * (dr[i1 + 1] - dr[i1]);
        double f[3] = {dor * r[0], dor * r[1], dor * r[2]};
        if (ee > 0) {
            double t = v / (v + ee);
            ee *= t;
            for (int d = 0; d < 3; d++) f[d] *= t * t;
        }
        e += ee;
        for (int d = 0; d < 3; d++) { w->g[3 * a + d] -= f[d]; w->g[3 * b + d] += f[d]; }
    }
    /* forces and torques up the tree */
    int nb = P->n_bodies;
    zero_d(w->F, 3 * nb);
    zero_d(w->T, 3 * nb);
    for (int i = 0; i < n; i++) {
        int b = P->atom_body[i];
        const double *gi = w->g + 3 * i, *O = w->O + 3 * b;
        double rr[3] = {w->x[3 * i] - O[0], w->x[3 * i + 1] - O[1], w->x[3 * i + 2] - O[2]};
        w->F[3 * b] += gi[0]; w->F[3 * b + 1] += gi[1]; w->F[3 * b + 2] += gi[2];
        w->T[3 * b] += rr[1] * gi[2] - rr[2] * gi[1];
        w->T[3 * b + 1] += rr[2] * gi[0] - rr[0] * gi[2];
        w->T[3 * b + 2] += rr[0] * gi[1] - rr[1] * gi[0];
    }
    for (int b = nb - 1; b >= 1; b--) {
        double ax[3];
        matvec(w->R + 9 * P->parent[b], P->axis_ref + 3 * b, ax);
        grad[6 + b - 1] = ax[0] * w->T[3 * b] + ax[1] * w->T[3 * b + 1] + ax[2] * w->T[3 * b + 2];
        int p = P->parent[b];
        double rr[3] = {w->O[3 * b] - w->O[3 * p], w->O[3 * b + 1] - w->O[3 * p + 1], w->O[3 * b + 2] - w->O[3 * p + 2]};
        const double *Fb = w->F + 3 * b;
        for (int d = 0; d < 3; d++) { w->F[3 * p + d] += Fb[d]; w->T[3 * p + d] += w->T[3 * b + d]; }
        w->T[3 * p] += rr[1] * Fb[2] - rr[2] * Fb[1];
        w->T[3 * p + 1] += rr[2] * Fb[0] - rr[0] * Fb[2];
        w->T[3 * p + 2] += rr[0] * Fb[1] - rr[1] * Fb[0];
    }
    for (int d = 0; d < 3; d++) { grad[d] = w->F[d]; grad[3 + d] = w->T[d]; }
    return e;
}

DEVICE void conf_increment(const double *c, const double *p, double alpha, double *out, int nt) {
    for (int d = 0; d < 3; d++) out[d] = c[d] + alpha * p[d];
    double rot[3] = {alpha * p[3], alpha * p[4], alpha * p[5]};
    copy_d(out + 3, c + 3, 4);
    quat_increment(out + 3, rot);
    for (int t = 0; t < nt; t++) out[7 + t] = normalize_angle(c[7 + t] + alpha * p[6 + t]);
}

/* Vina's bfgs() with its Armijo line search (c0 = 1e-4, halving, 10 trials) */
DEVICE double bfgs(const problem *P, double *x, double v, int max_steps, work *w, double *buf) {
    int nt = P->n_bodies - 1, n = 6 + nt, nc = 7 + nt;
    double *h = buf, *g = h + n * n, *gn = g + n, *p = gn + n, *y = p + n, *mhy = y + n;
    double *xn = mhy + n, *xo = xn + nc, *go = xo + nc;
    for (int i = 0; i < n * n; i++) h[i] = 0;
    for (int i = 0; i < n; i++) h[i * n + i] = 1;
    double f0 = eval_deriv(P, x, v, w, g), forig = f0;
    copy_d(xo, x, nc);
    copy_d(go, g, n);
    for (int step = 0; step < max_steps; step++) {
        for (int i = 0; i < n; i++) {
            double s = 0;
            for (int j = 0; j < n; j++) s += h[i * n + j] * g[j];
            p[i] = -s;
        }
        double pg = 0, alpha = 1, f1 = 0;
        for (int i = 0; i < n; i++) pg += p[i] * g[i];
        for (int trial = 0; trial < 10; trial++) {
            conf_increment(x, p, alpha, xn, nt);
            f1 = eval_deriv(P, xn, v, w, gn);
            if (f1 - f0 < 1e-4 * alpha * pg) break;
            alpha *= 0.5;
        }
        for (int i = 0; i < n; i++) y[i] = gn[i] - g[i];
        f0 = f1;
        copy_d(x, xn, nc);
        double gg = 0;
        for (int i = 0; i < n; i++) gg += g[i] * g[i];
        if (!(sqrt(gg) >= 1e-5)) break;
        copy_d(g, gn, n);
        if (step == 0) {
            double yy = 0, yp = 0;
            for (int i = 0; i < n; i++) { yy += y[i] * y[i]; yp += y[i] * p[i]; }
            if (fabs(yy) > EPS)
                for (int i = 0; i < n; i++) h[i * n + i] = alpha * yp / yy;
        }
        double yp = 0;
        for (int i = 0; i < n; i++) yp += y[i] * p[i];
        if (alpha * yp < EPS) continue;
        for (int i = 0; i < n; i++) {
            double s = 0;
            for (int j = 0; j < n; j++) s += h[i * n + j] * y[j];
            mhy[i] = -s;
        }
        double yhy = 0;
        for (int i = 0; i < n; i++) yhy -= y[i] * mhy[i];
        double r = 1 / (alpha * yp);
        for (int i = 0; i < n; i++)
            for (int j = i; j < n; j++) {
                double d = alpha * r * (mhy[i] * p[j] + mhy[j] * p[i]) + alpha * alpha * (r * r * yhy + r) * p[i] * p[j];
                h[i * n + j] += d;
                if (j != i) h[j * n + i] += d;
            }
    }
    if (!(f0 <= forig)) {
        f0 = forig;
        copy_d(x, xo, nc);
    }
    return f0;
}

DEVICE double heavy_rmsd(const problem *P, const double *a, const double *b) {
    double s = 0;
    for (int i = 0; i < P->n_atoms; i++) {
        if (P->atom_map[i] < 0) continue;
        for (int d = 0; d < 3; d++) { double q = a[3 * i + d] - b[3 * i + d]; s += q * q; }
    }
    return sqrt(s / (P->n_heavy > 0 ? P->n_heavy : 1));
}

/* put pose (e, c, x) in slot k and bubble it up to keep E ascending */
DEVICE void place_pose(int k, int nc, int na3, double *E, double *C, double *X, double e, const double *c,
                       const double *x) {
    E[k] = e;
    copy_d(C + (long)k * nc, c, nc);
    copy_d(X + (long)k * na3, x, na3);
    while (k > 0 && E[k] < E[k - 1]) {
        double te = E[k]; E[k] = E[k - 1]; E[k - 1] = te;
        for (int i = 0; i < nc; i++) { double t = C[(long)k * nc + i]; C[(long)k * nc + i] = C[(long)(k - 1) * nc + i]; C[(long)(k - 1) * nc + i] = t; }
        for (int i = 0; i < na3; i++) { double t = X[(long)k * na3 + i]; X[(long)k * na3 + i] = X[(long)(k - 1) * na3 + i]; X[(long)(k - 1) * na3 + i] = t; }
        k--;
    }
}

/* keep up to `cap` poses sorted by energy, none within min_rmsd of another (Vina add_to_output_container) */
DEVICE void add_pose(const problem *P, int *count, int cap, double *E, double *C, double *X, double e, const double *c,
                     const double *x, double min_rmsd) {
    int nc = 6 + P->n_bodies, na3 = 3 * P->n_atoms;
    for (int k = 0; k < *count; k++) {
        if (heavy_rmsd(P, X + (long)k * na3, x) < min_rmsd) {
            if (e < E[k]) place_pose(k, nc, na3, E, C, X, e, c, x); /* replace and re-sort */
            return;
        }
    }
    int k = *count < cap ? (*count)++ : cap - 1;
    if (k == cap - 1 && *count == cap && e >= E[k]) return;
    place_pose(k, nc, na3, E, C, X, e, c, x);
}


/* ------------------------------------------------------------------ work pool */
/* doubles one chain needs: coordinates, gradients, body frames, BFGS state, current/candidate
 * conformations and a pose buffer */
DEVICE long chain_pool_doubles(int n_atoms, int n_bodies) {
    long n = 5 + n_bodies, nc = 6 + n_bodies;
    return 6L * n_atoms + 18L * n_bodies + (n * n + 6 * n + 3 * nc + 8) + 2 * nc + 3L * n_atoms;
}
/* carve `w` and the BFGS buffer out of `pool`; returns the first unused double */
DEVICE double *work_bind(const problem *P, double *pool, work *w, double **bfgs_buf) {
    int na = P->n_atoms, nb = P->n_bodies;
    long n = 5 + nb, nc = 6 + nb;
    w->x = pool; pool += 3 * na;
    w->g = pool; pool += 3 * na;
    w->R = pool; pool += 9 * nb;
    w->O = pool; pool += 3 * nb;
    w->F = pool; pool += 3 * nb;
    w->T = pool; pool += 3 * nb;
    *bfgs_buf = pool; pool += n * n + 6 * n + 3 * nc + 8;
    return pool;
}

/* ------------------------------------------------------------------ one Monte Carlo chain */
/* chain `chain` of a ligand whose stream seed is `seed`; keeps up to `keep` poses in Ek/Ck/Xk */
DEVICE void mc_chain(const problem *P, u64 seed, u64 chain, int global_steps, int local_steps, double min_rmsd,
                     int keep, double *Ek, double *Ck, double *Xk, int *n_kept, long *n_evals, double *pool) {
    int nb = P->n_bodies, n_atoms = P->n_atoms, nc = 6 + nb, nt = nb - 1;
    work w;
    double *buf;
    double *cur = work_bind(P, pool, &w, &buf), *cand = cur + nc, *xb = cand + nc;
    /* gyration radius about the root origin, in the reference conformation (sets cur) */
    double gr = 0;
    copy_d(cur, P->root_origin, 3);
    cur[3] = 1; cur[4] = cur[5] = cur[6] = 0;
    for (int t = 0; t < nt; t++) cur[7 + t] = 0;
    set_conf(P, cur, &w);
    for (int i = 0; i < n_atoms; i++) {
        if (P->atom_map[i] < 0) continue;
        for (int d = 0; d < 3; d++) { double q = w.x[3 * i + d] - P->root_origin[d]; gr += q * q; }
    }
    gr = P->n_heavy > 0 ? sqrt(gr / P->n_heavy) : 0;

    rng_t r;
    rng_seed(&r, seed, chain);
    int count = 0;
    long evals = 0;
    /* random start: origin uniform in the box, uniform random orientation, random torsions */
    for (int d = 0; d < 3; d++) cur[d] = uni(&r, P->begin[d], P->bend[d]);
    double q[4], qn = 0;
    for (int i = 0; i < 4; i++) { q[i] = gauss(&r); qn += q[i] * q[i]; }
    for (int i = 0; i < 4; i++) cur[3 + i] = q[i] / sqrt(qn);
    for (int t = 0; t < nt; t++) cur[7 + t] = uni(&r, -PI, PI);
    double e_cur = 1e300, best = 1e300;
    for (int step = 0; step < global_steps; step++) {
        copy_d(cand, cur, nc);
        int which = (int)(rng_next(&r) % (u64)(2 + nt));
        if (which == 0) {
            double s[3];
            in_sphere(&r, s);
            for (int d = 0; d < 3; d++) cand[d] += 2.0 * s[d];
        } else if (which == 1) {
            if (gr > EPS) {
                double s[3];
                in_sphere(&r, s);
                for (int d = 0; d < 3; d++) s[d] *= 2.0 / gr;
                quat_increment(cand + 3, s);
            }
        } else {
            cand[7 + which - 2] = uni(&r, -PI, PI);
        }
        double e = bfgs(P, cand, 10.0, local_steps, &w, buf);
        evals += local_steps;
        int accept = step == 0 || e < e_cur || uni(&r, 0, 1) < exp((e_cur - e) / 1.2);
        if (!accept) continue;
        copy_d(cur, cand, nc);
        e_cur = e;
        if (e < best || count < keep) {
            double e2 = bfgs(P, cur, 1000.0, local_steps, &w, buf);
            e_cur = e2;
            set_conf(P, cur, &w);
            copy_d(xb, w.x, 3 * n_atoms);
            add_pose(P, &count, keep, Ek, Ck, Xk, e2, cur, xb, min_rmsd);
            if (e2 < best) best = e2;
        }
    }
    *n_kept = count;
    *n_evals = evals;
}

/* ------------------------------------------------------------------ packed batch */
/* Ligand l's arrays are slices of concatenated arrays (CSR offsets lig_off[l*8 + k]: atoms, bodies,
 * pairs, table rows, conformation outputs, coordinate outputs, pool; k = 7 unused); chain c of the
 * batch is chain c % exh of ligand c / exh. Every ligand shares the receptor maps. */
DEVICE void batch_chain(long c, int exh, const int *npts, const double *begin, const double *end, double slope,
                        const double *maps, const long *lig_off, const int *lig_steps, const u64 *lig_seed,
                        const int *atom_map, const int *atom_body, const double *local, const int *parent,
                        const double *origin_rel, const double *axis_ref, const double *root_origin,
                        const int *pairs, const int *pair_tab, const double *smooth, const double *dor, int ntab,
                        double min_rmsd, int keep, double *E, double *C, double *X, int *n_kept, long *n_evals,
                        double *pool) {
    long l = c / exh, k = c % exh;
    const long *o = lig_off + 8 * l, *o1 = o + 8;
    problem P;
    for (int d = 0; d < 3; d++) {
        P.npts[d] = npts[d];
        P.begin[d] = begin[d];
        P.factor[d] = (npts[d] - 1) / (end[d] - begin[d]);
        P.factor_inv[d] = 1.0 / P.factor[d];
        P.bend[d] = end[d];
    }
    P.slope = slope; P.maps = maps; P.ntab = ntab;
    P.n_atoms = (int)(o1[0] - o[0]); P.n_bodies = (int)(o1[1] - o[1]); P.n_pairs = (int)(o1[2] - o[2]);
    P.atom_map = atom_map + o[0]; P.atom_body = atom_body + o[0]; P.local = local + 3 * o[0];
    P.parent = parent + o[1]; P.origin_rel = origin_rel + 3 * o[1]; P.axis_ref = axis_ref + 3 * o[1];
    P.root_origin = root_origin + 3 * l;
    P.pairs = pairs + 2 * o[2]; P.pair_tab = pair_tab + o[2];
    P.smooth = smooth + o[3] * ntab; P.dor = dor + o[3] * ntab;
    P.n_heavy = 0;
    for (int i = 0; i < P.n_atoms; i++) P.n_heavy += P.atom_map[i] >= 0;
    P.rxyz = 0;
    int nc = 6 + P.n_bodies;
    mc_chain(&P, lig_seed[l], (u64)k, lig_steps[2 * l], lig_steps[2 * l + 1], min_rmsd, keep, E + c * keep,
             C + o[4] + k * keep * nc, X + o[5] + k * keep * 3 * P.n_atoms, n_kept + c, n_evals + c,
             pool + o[6] + k * chain_pool_doubles(P.n_atoms, P.n_bodies));
}
#endif
