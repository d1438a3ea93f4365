/* AutoDock Vina grid maps and Monte Carlo + BFGS docking search, C99 + OpenMP.
 *
 * Maps: for each ligand XS type, the summed pair energy of the receptor heavy atoms within 8 A of
 * every grid point (Vina cache::populate), from Vina's r^2 table.
 * Search: one independent Monte Carlo chain per OpenMP iteration (Vina monte_carlo::operator()):
 * random start in the box, mutate one of position / orientation / one torsion, BFGS local
 * optimisation, Metropolis acceptance at T = 1.2, promising poses refined and kept if they differ
 * by > min_rmsd from the chain's other poses. Energies: trilinear map interpolation (+ out-of-box
 * penalty) and intramolecular pairs from the smooth table, each curled as Vina does.
 * Each chain has its own random stream keyed by (seed, chain), so results do not depend on the
 * number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NTAB_FACTOR 32.0
#define CUTOFF_SQR 64.0
#define EPS 2.22044604925031308e-16
#define PI 3.14159265358979323846

/* ------------------------------------------------------------------ grid maps */
int vina_maps(int n_types, const int *types, const int *npts, const double *begin, const double *end,
              int n_rec, const double *rxyz, const int *rxs, int n_xs, const double *fast, int ntab,
              double *out, int threads) {
    double factor_inv[3];
    for (int d = 0; d < 3; d++) factor_inv[d] = 1.0 / ((npts[d] - 1) / (end[d] - begin[d]));
    /* cell list over 8 A cells covering box +- 8 A */
    double lo[3];
    int nc[3];
    for (int d = 0; d < 3; d++) {
        lo[d] = begin[d] - 8.0;
        nc[d] = (int)ceil((end[d] + 8.0 - lo[d]) / 8.0) + 1;
    }
    long ncell = (long)nc[0] * nc[1] * nc[2];
    int *count = calloc(ncell + 1, sizeof(int));
    int *order = malloc(sizeof(int) * (n_rec > 0 ? n_rec : 1));
    int *cell_of = malloc(sizeof(int) * (n_rec > 0 ? n_rec : 1));
    if (!count || !order || !cell_of) return -1;
    for (int i = 0; i < n_rec; i++) {
        int c[3], ok = 1;
        for (int d = 0; d < 3; d++) {
            c[d] = (int)floor((rxyz[3 * i + d] - lo[d]) / 8.0);
            if (c[d] < 0 || c[d] >= nc[d]) ok = 0;
        }
        cell_of[i] = ok ? (c[0] * nc[1] + c[1]) * nc[2] + c[2] : -1;
        if (ok) count[cell_of[i] + 1]++;
    }
    for (long c = 0; c < ncell; c++) count[c + 1] += count[c];
    int *fill = malloc(sizeof(int) * ncell);
    memcpy(fill, count, sizeof(int) * ncell);
    for (int i = 0; i < n_rec; i++)
        if (cell_of[i] >= 0) order[fill[cell_of[i]]++] = i;
    free(fill);
    long nxyz = (long)npts[0] * npts[1] * npts[2];
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#pragma omp parallel for schedule(dynamic, 64)
#endif
    for (long g = 0; g < nxyz; g++) {
        int ix = (int)(g / ((long)npts[1] * npts[2])), iy = (int)((g / npts[2]) % npts[1]), iz = (int)(g % npts[2]);
        double p[3] = {begin[0] + factor_inv[0] * ix, begin[1] + factor_inv[1] * iy, begin[2] + factor_inv[2] * iz};
        double acc[32];
        for (int k = 0; k < n_types; k++) acc[k] = 0.0;
        int c0[3];
        for (int d = 0; d < 3; d++) c0[d] = (int)floor((p[d] - lo[d]) / 8.0);
        for (int a = c0[0] - 1; a <= c0[0] + 1; a++) {
            if (a < 0 || a >= nc[0]) continue;
            for (int b = c0[1] - 1; b <= c0[1] + 1; b++) {
                if (b < 0 || b >= nc[1]) continue;
                for (int c = c0[2] - 1; c <= c0[2] + 1; c++) {
                    if (c < 0 || c >= nc[2]) continue;
                    long cell = ((long)a * nc[1] + b) * nc[2] + c;
                    for (int q = count[cell]; q < count[cell + 1]; q++) {
                        int i = order[q];
                        double dx = rxyz[3 * i] - p[0], dy = rxyz[3 * i + 1] - p[1], dz = rxyz[3 * i + 2] - p[2];
                        double r2 = dx * dx + dy * dy + dz * dz;
                        if (r2 <= CUTOFF_SQR) {
                            int idx = (int)(NTAB_FACTOR * r2);
                            for (int k = 0; k < n_types; k++)
                                acc[k] += fast[((long)types[k] * n_xs + rxs[i]) * ntab + idx];
                        }
                    }
                }
            }
        }
        for (int k = 0; k < n_types; k++) out[k * nxyz + g] = acc[k];
    }
    free(count);
    free(order);
    free(cell_of);
    return 0;
}

/* ------------------------------------------------------------------ random numbers */
typedef struct { uint64_t s[4]; } rng_t;
static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static void rng_seed(rng_t *r, uint64_t seed, uint64_t stream) {
    uint64_t x = seed ^ (0xD1B54A32D192ED03ull * (stream + 1));
    for (int i = 0; i < 4; i++) r->s[i] = splitmix(&x);
}
static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
static uint64_t rng_next(rng_t *r) { /* xoshiro256** */
    uint64_t *s = r->s, res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return res;
}
static double uni(rng_t *r, double a, double b) { return a + (b - a) * ((rng_next(r) >> 11) * (1.0 / 9007199254740992.0)); }
static double gauss(rng_t *r) {
    double u = uni(r, 1e-300, 1.0), v = uni(r, 0.0, 1.0);
    return sqrt(-2.0 * log(u)) * cos(2.0 * PI * v);
}
static void in_sphere(rng_t *r, double *v) {
    for (;;) {
        v[0] = uni(r, -1, 1); v[1] = uni(r, -1, 1); v[2] = uni(r, -1, 1);
        if (v[0] * v[0] + v[1] * v[1] + v[2] * v[2] < 1) return;
    }
}

/* ------------------------------------------------------------------ geometry */
static void quat_to_mat(const double *q, double *m) {
    double w = q[0], x = q[1], y = q[2], z = q[3];
    m[0] = 1 - 2 * (y * y + z * z); m[1] = 2 * (x * y - w * z); m[2] = 2 * (x * z + w * y);
    m[3] = 2 * (x * y + w * z); m[4] = 1 - 2 * (x * x + z * z); m[5] = 2 * (y * z - w * x);
    m[6] = 2 * (x * z - w * y); m[7] = 2 * (y * z + w * x); m[8] = 1 - 2 * (x * x + y * y);
}
static void quat_increment(double *q, const double *rot) { /* q <- quat(rot) * q, normalised */
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
static void axis_angle(const double *u, double t, double *m) {
    double c = cos(t), s = sin(t), C = 1 - c, x = u[0], y = u[1], z = u[2];
    m[0] = c + x * x * C; m[1] = x * y * C - z * s; m[2] = x * z * C + y * s;
    m[3] = y * x * C + z * s; m[4] = c + y * y * C; m[5] = y * z * C - x * s;
    m[6] = z * x * C - y * s; m[7] = z * y * C + x * s; m[8] = c + z * z * C;
}
static void matmul(const double *a, const double *b, double *o) {
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) o[3 * i + j] = a[3 * i] * b[j] + a[3 * i + 1] * b[3 + j] + a[3 * i + 2] * b[6 + j];
}
static void matvec(const double *m, const double *v, double *o) {
    for (int i = 0; i < 3; i++) o[i] = m[3 * i] * v[0] + m[3 * i + 1] * v[1] + m[3 * i + 2] * v[2];
}
static double normalize_angle(double x) {
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
static void set_conf(const problem *P, const double *c, work *w) {
    quat_to_mat(c + 3, w->R);
    memcpy(w->O, c, 3 * sizeof(double));
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

static double grid_eval(const problem *P, int m, const double *loc, double v, double *deriv) {
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
static double explicit_eval(const problem *P, int i, const double *x, double v, double *deriv) {
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
static double eval_deriv(const problem *P, const double *c, double v, work *w, double *grad) {
    set_conf(P, c, w);
    int n = P->n_atoms;
    double e = 0;
    memset(w->g, 0, sizeof(double) * 3 * n);
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
    memset(w->F, 0, sizeof(double) * 3 * nb);
    memset(w->T, 0, sizeof(double) * 3 * nb);
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

static void conf_increment(const double *c, const double *p, double alpha, double *out, int nt) {
    for (int d = 0; d < 3; d++) out[d] = c[d] + alpha * p[d];
    double rot[3] = {alpha * p[3], alpha * p[4], alpha * p[5]};
    memcpy(out + 3, c + 3, 4 * sizeof(double));
    quat_increment(out + 3, rot);
    for (int t = 0; t < nt; t++) out[7 + t] = normalize_angle(c[7 + t] + alpha * p[6 + t]);
}

/* Vina's bfgs() with its Armijo line search (c0 = 1e-4, halving, 10 trials) */
static double bfgs(const problem *P, double *x, double v, int max_steps, work *w, double *buf) {
    int nt = P->n_bodies - 1, n = 6 + nt, nc = 7 + nt;
    double *h = buf, *g = h + n * n, *gn = g + n, *p = gn + n, *y = p + n, *mhy = y + n;
    double *xn = mhy + n, *xo = xn + nc, *go = xo + nc;
    for (int i = 0; i < n * n; i++) h[i] = 0;
    for (int i = 0; i < n; i++) h[i * n + i] = 1;
    double f0 = eval_deriv(P, x, v, w, g), forig = f0;
    memcpy(xo, x, nc * sizeof(double));
    memcpy(go, g, n * sizeof(double));
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
        memcpy(x, xn, nc * sizeof(double));
        double gg = 0;
        for (int i = 0; i < n; i++) gg += g[i] * g[i];
        if (!(sqrt(gg) >= 1e-5)) break;
        memcpy(g, gn, n * sizeof(double));
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
        memcpy(x, xo, nc * sizeof(double));
    }
    return f0;
}

static double heavy_rmsd(const problem *P, const double *a, const double *b) {
    double s = 0;
    for (int i = 0; i < P->n_atoms; i++) {
        if (P->atom_map[i] < 0) continue;
        for (int d = 0; d < 3; d++) { double q = a[3 * i + d] - b[3 * i + d]; s += q * q; }
    }
    return sqrt(s / (P->n_heavy > 0 ? P->n_heavy : 1));
}

/* keep up to `cap` poses sorted by energy, none within min_rmsd of another (Vina add_to_output_container) */
static void add_pose(const problem *P, int *count, int cap, double *E, double *C, double *X, double e, const double *c,
                     const double *x, double min_rmsd) {
    int nc = 6 + P->n_bodies, na3 = 3 * P->n_atoms;
    for (int k = 0; k < *count; k++) {
        if (heavy_rmsd(P, X + (long)k * na3, x) < min_rmsd) {
            if (e < E[k]) { /* replace and re-sort */
                E[k] = e;
                memcpy(C + (long)k * nc, c, nc * sizeof(double));
                memcpy(X + (long)k * na3, x, na3 * sizeof(double));
                while (k > 0 && E[k] < E[k - 1]) {
                    double te = E[k]; E[k] = E[k - 1]; E[k - 1] = te;
                    for (int i = 0; i < nc; i++) { double t = C[(long)k * nc + i]; C[(long)k * nc + i] = C[(long)(k - 1) * nc + i]; C[(long)(k - 1) * nc + i] = t; }
                    for (int i = 0; i < na3; i++) { double t = X[(long)k * na3 + i]; X[(long)k * na3 + i] = X[(long)(k - 1) * na3 + i]; X[(long)(k - 1) * na3 + i] = t; }
                    k--;
                }
            }
            return;
        }
    }
    int k = *count < cap ? (*count)++ : cap - 1;
    if (k == cap - 1 && *count == cap && e >= E[k]) return;
    E[k] = e;
    memcpy(C + (long)k * nc, c, nc * sizeof(double));
    memcpy(X + (long)k * na3, x, na3 * sizeof(double));
    while (k > 0 && E[k] < E[k - 1]) {
        double te = E[k]; E[k] = E[k - 1]; E[k - 1] = te;
        for (int i = 0; i < nc; i++) { double t = C[(long)k * nc + i]; C[(long)k * nc + i] = C[(long)(k - 1) * nc + i]; C[(long)(k - 1) * nc + i] = t; }
        for (int i = 0; i < na3; i++) { double t = X[(long)k * na3 + i]; X[(long)k * na3 + i] = X[(long)(k - 1) * na3 + i]; X[(long)(k - 1) * na3 + i] = t; }
        k--;
    }
}

static void alloc_work(const problem *P, work *w) {
    w->x = malloc(sizeof(double) * 3 * P->n_atoms);
    w->g = malloc(sizeof(double) * 3 * P->n_atoms);
    w->R = malloc(sizeof(double) * 9 * P->n_bodies);
    w->O = malloc(sizeof(double) * 3 * P->n_bodies);
    w->F = malloc(sizeof(double) * 3 * P->n_bodies);
    w->T = malloc(sizeof(double) * 3 * P->n_bodies);
}
static void free_work(work *w) { free(w->x); free(w->g); free(w->R); free(w->O); free(w->F); free(w->T); }

static void fill_problem(problem *P, const int *npts, const double *begin, const double *end, double slope,
                         const double *maps, int n_atoms, const int *atom_map, const int *atom_body, const double *local,
                         int n_bodies, const int *parent, const double *origin_rel, const double *axis_ref,
                         const double *root_origin, int n_pairs, const int *pairs, const int *pair_tab,
                         const double *smooth, const double *dor, int ntab) {
    for (int d = 0; d < 3; d++) {
        P->npts[d] = npts[d];
        P->begin[d] = begin[d];
        P->factor[d] = (npts[d] - 1) / (end[d] - begin[d]);
        P->factor_inv[d] = 1.0 / P->factor[d];
    }
    P->slope = slope; P->maps = maps; P->n_atoms = n_atoms; P->atom_map = atom_map; P->atom_body = atom_body;
    P->local = local; P->n_bodies = n_bodies; P->parent = parent; P->origin_rel = origin_rel; P->axis_ref = axis_ref;
    P->root_origin = root_origin; P->n_pairs = n_pairs; P->pairs = pairs; P->pair_tab = pair_tab; P->smooth = smooth;
    P->dor = dor; P->ntab = ntab;
    P->n_heavy = 0;
    for (int i = 0; i < n_atoms; i++) P->n_heavy += atom_map[i] >= 0;
    P->rxyz = NULL;
    for (int d = 0; d < 3; d++) P->bend[d] = end[d];
}

/* energy + gradient of given confs (for tests: finite differences, parity with NumPy) */
int vina_eval(const int *npts, const double *begin, const double *end, double slope, const double *maps,
              int n_atoms, const int *atom_map, const int *atom_body, const double *local, int n_bodies,
              const int *parent, const double *origin_rel, const double *axis_ref, const double *root_origin,
              int n_pairs, const int *pairs, const int *pair_tab, const double *smooth, const double *dor, int ntab,
              int n_conf, const double *confs, double v, double *e_out, double *grad_out, double *x_out) {
    problem P;
    fill_problem(&P, npts, begin, end, slope, maps, n_atoms, atom_map, atom_body, local, n_bodies, parent, origin_rel,
                 axis_ref, root_origin, n_pairs, pairs, pair_tab, smooth, dor, ntab);
    work w;
    alloc_work(&P, &w);
    int nc = 6 + n_bodies, ng = 5 + n_bodies;
    for (int k = 0; k < n_conf; k++) {
        e_out[k] = eval_deriv(&P, confs + (long)k * nc, v, &w, grad_out + (long)k * ng);
        memcpy(x_out + (long)k * 3 * n_atoms, w.x, sizeof(double) * 3 * n_atoms);
    }
    free_work(&w);
    return 0;
}

/* local optimisation of given confs (Vina optimize / local_only) */
int vina_local(const int *npts, const double *begin, const double *end, double slope, const double *maps,
               int n_atoms, const int *atom_map, const int *atom_body, const double *local, int n_bodies,
               const int *parent, const double *origin_rel, const double *axis_ref, const double *root_origin,
               int n_pairs, const int *pairs, const int *pair_tab, const double *smooth, const double *dor, int ntab,
               int n_conf, double *confs, double v, int max_steps, double *e_out, double *x_out) {
    problem P;
    fill_problem(&P, npts, begin, end, slope, maps, n_atoms, atom_map, atom_body, local, n_bodies, parent, origin_rel,
                 axis_ref, root_origin, n_pairs, pairs, pair_tab, smooth, dor, ntab);
    work w;
    alloc_work(&P, &w);
    int nc = 6 + n_bodies, n = 5 + n_bodies;
    double *buf = malloc(sizeof(double) * (n * n + 6 * n + 3 * nc + 8));
    for (int k = 0; k < n_conf; k++) {
        e_out[k] = bfgs(&P, confs + (long)k * nc, v, max_steps, &w, buf);
        set_conf(&P, confs + (long)k * nc, &w);
        memcpy(x_out + (long)k * 3 * n_atoms, w.x, sizeof(double) * 3 * n_atoms);
    }
    free(buf);
    free_work(&w);
    return 0;
}

/* n_chains Monte Carlo chains; chain k keeps up to `keep` poses in E/C/X[k*keep ...] */
int vina_dock(const int *npts, const double *begin, const double *end, double slope, const double *maps,
              int n_atoms, const int *atom_map, const int *atom_body, const double *local, int n_bodies,
              const int *parent, const double *origin_rel, const double *axis_ref, const double *root_origin,
              int n_pairs, const int *pairs, const int *pair_tab, const double *smooth, const double *dor, int ntab,
              int n_chains, uint64_t seed, int global_steps, int local_steps, double min_rmsd, int keep,
              double *E, double *C, double *X, int *n_kept, long *n_evals, int threads) {
    problem P;
    fill_problem(&P, npts, begin, end, slope, maps, n_atoms, atom_map, atom_body, local, n_bodies, parent, origin_rel,
                 axis_ref, root_origin, n_pairs, pairs, pair_tab, smooth, dor, ntab);
    int nc = 6 + n_bodies, nt = n_bodies - 1, n = 5 + n_bodies;
    /* gyration radius about the root origin, in the reference conformation */
    double gr = 0;
    {
        work w;
        alloc_work(&P, &w);
        double c0[64 + 7];
        double *cc = nc <= 71 ? c0 : malloc(sizeof(double) * nc);
        memcpy(cc, root_origin, 3 * sizeof(double));
        cc[3] = 1; cc[4] = cc[5] = cc[6] = 0;
        for (int t = 0; t < nt; t++) cc[7 + t] = 0;
        set_conf(&P, cc, &w);
        for (int i = 0; i < n_atoms; i++) {
            if (atom_map[i] < 0) continue;
            for (int d = 0; d < 3; d++) { double q = w.x[3 * i + d] - root_origin[d]; gr += q * q; }
        }
        gr = P.n_heavy > 0 ? sqrt(gr / P.n_heavy) : 0;
        if (cc != c0) free(cc);
        free_work(&w);
    }
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (int k = 0; k < n_chains; k++) {
        rng_t r;
        rng_seed(&r, seed, (uint64_t)k);
        work w;
        alloc_work(&P, &w);
        double *buf = malloc(sizeof(double) * (n * n + 6 * n + 3 * nc + 8));
        double *cur = malloc(sizeof(double) * nc), *cand = malloc(sizeof(double) * nc), *xb = malloc(sizeof(double) * 3 * n_atoms);
        double *Ek = E + (long)k * keep, *Ck = C + (long)k * keep * nc, *Xk = X + (long)k * keep * 3 * n_atoms;
        int count = 0;
        long evals = 0;
        /* random start: origin uniform in the box, uniform random orientation, random torsions */
        double end_[3] = {end[0], end[1], end[2]};
        for (int d = 0; d < 3; d++) cur[d] = uni(&r, begin[d], end_[d]);
        double q[4], qn = 0;
        for (int i = 0; i < 4; i++) { q[i] = gauss(&r); qn += q[i] * q[i]; }
        for (int i = 0; i < 4; i++) cur[3 + i] = q[i] / sqrt(qn);
        for (int t = 0; t < nt; t++) cur[7 + t] = uni(&r, -PI, PI);
        double e_cur = 1e300, best = 1e300;
        for (int step = 0; step < global_steps; step++) {
            memcpy(cand, cur, nc * sizeof(double));
            int which = (int)(rng_next(&r) % (uint64_t)(2 + nt));
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
            double e = bfgs(&P, cand, 10.0, local_steps, &w, buf);
            evals += local_steps;
            int accept = step == 0 || e < e_cur || uni(&r, 0, 1) < exp((e_cur - e) / 1.2);
            if (!accept) continue;
            memcpy(cur, cand, nc * sizeof(double));
            e_cur = e;
            if (e < best || count < keep) {
                double e2 = bfgs(&P, cur, 1000.0, local_steps, &w, buf);
                e_cur = e2;
                set_conf(&P, cur, &w);
                memcpy(xb, w.x, sizeof(double) * 3 * n_atoms);
                add_pose(&P, &count, keep, Ek, Ck, Xk, e2, cur, xb, min_rmsd);
                if (e2 < best) best = e2;
            }
        }
        n_kept[k] = count;
        n_evals[k] = evals;
        free(buf); free(cur); free(cand); free(xb);
        free_work(&w);
    }
    return 0;
}

/* BFGS of given confs against explicit receptor atoms (Vina refines its final poses this way) */
int vina_refine(const int *npts, const double *begin, const double *end, double slope, const double *maps,
                int n_atoms, const int *atom_map, const int *atom_body, const double *local, int n_bodies,
                const int *parent, const double *origin_rel, const double *axis_ref, const double *root_origin,
                int n_pairs, const int *pairs, const int *pair_tab, const double *smooth, const double *dor, int ntab,
                int n_rec, const double *rxyz, const int *rxs, const int *atom_xs, int n_xs, const double *rsmooth,
                const double *rdor, const double *clo, const int *nc, const int *cell_start, const int *cell_order,
                int n_conf, double *confs, double v, int max_steps, double *e_out, double *x_out, int threads) {
    problem P;
    fill_problem(&P, npts, begin, end, slope, maps, n_atoms, atom_map, atom_body, local, n_bodies, parent, origin_rel,
                 axis_ref, root_origin, n_pairs, pairs, pair_tab, smooth, dor, ntab);
    P.rxyz = rxyz; P.rxs = rxs; P.atom_xs = atom_xs; P.n_xs = n_xs; P.rsmooth = rsmooth; P.rdor = rdor;
    P.n_rec = n_rec; P.cell_start = cell_start; P.cell_order = cell_order;
    for (int d = 0; d < 3; d++) { P.clo[d] = clo[d]; P.nc[d] = nc[d]; }
    int nc_ = 6 + n_bodies, n = 5 + n_bodies;
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (int k = 0; k < n_conf; k++) {
        work w;
        alloc_work(&P, &w);
        double *buf = malloc(sizeof(double) * (n * n + 6 * n + 3 * nc_ + 8));
        e_out[k] = bfgs(&P, confs + (long)k * nc_, v, max_steps, &w, buf);
        set_conf(&P, confs + (long)k * nc_, &w);
        memcpy(x_out + (long)k * 3 * n_atoms, w.x, sizeof(double) * 3 * n_atoms);
        free(buf);
        free_work(&w);
    }
    return 0;
}
