/* AutoDock Vina grid maps, and the host entry points of the docking search, C99 + OpenMP.
 *
 * Maps: for each ligand XS type, the summed pair energy of the receptor heavy atoms within 8 A of
 * every grid point (Vina cache::populate), from Vina's r^2 table.
 * Search: the per-chain code lives in vina_chain.h (device-portable; the `cuda` backend compiles
 * the same text in vina_dock_batch.cu). vina_dock_batch runs a packed batch of ligands x
 * exhaustiveness chains, one chain per OpenMP iteration; vina_eval / vina_local / vina_refine
 * evaluate, optimise and refine given conformations (refinement against explicit receptor atoms).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "vina_chain.h"

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

/* a packed batch of ligands x exh chains (layout: batch_chain in vina_chain.h), one chain per
 * OpenMP iteration; `pool` holds chain_pool_doubles() per chain at the ligand's pool offset */
int vina_dock_batch(int n_lig, int exh, const int *npts, const double *begin, const double *end, double slope,
                    const double *maps, const long *lig_off, const int *lig_steps, const u64 *lig_seed,
                    const int *atom_map, const int *atom_body, const double *local, const int *parent,
                    const double *origin_rel, const double *axis_ref, const double *root_origin, const int *pairs,
                    const int *pair_tab, const double *smooth, const double *dor, int ntab, double min_rmsd,
                    int keep, double *E, double *C, double *X, int *n_kept, long *n_evals, double *pool,
                    int threads) {
    long n = (long)n_lig * exh;
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (long c = 0; c < n; c++)
        batch_chain(c, exh, npts, begin, end, slope, maps, lig_off, lig_steps, lig_seed, atom_map, atom_body, local,
                    parent, origin_rel, axis_ref, root_origin, pairs, pair_tab, smooth, dor, ntab, min_rmsd, keep, E,
                    C, X, n_kept, n_evals, pool);
    return 0;
}
