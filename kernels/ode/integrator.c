/* Per-patient time loop: adaptive Dormand–Prince 5(4) (FSAL, Hairer's norm and step control) or
 * fixed-step RK4, with exact stops at events and sample times. The arithmetic mirrors
 * integrate_numpy.py operation by operation (no FMA contraction), so the backends agree to
 * round-off; see tests/test_kernel_parity.py.
 *
 * Layouts (structure of arrays): P[i*m + pat], events [e*m + pat], atol[NS], times[T];
 * out is [n_rec, m, T] on the CPU (each thread writes its own rows) and [n_rec, T, m] on the GPU
 * (neighbouring threads write neighbouring addresses).
 * Status codes: 0 ok, 1 nonfinite, 2 step_underflow, 3 max_steps (engine/layout.py).
 */
#ifdef KERNEL_CUDA
#define OUT_AT(r, pat, k) (((twin_idx)(r) * T + (k)) * m + (pat))
#else
#define OUT_AT(r, pat, k) (((twin_idx)(r) * m + (pat)) * T + (k))
#endif
#define EVT(e) ((e) < n_ev ? ev_t[(twin_idx)(e) * m + pat] : TWIN_INF)

DEVICE real rmax(real a, real b) { return a > b ? a : b; }
DEVICE real rmin(real a, real b) { return a < b ? a : b; }

/* LU with partial pivoting, element order identical to integrate_numpy._lu */
DEVICE void lu_factor(real* G, int* perm) {
    int i, j, k;
    for (i = 0; i < NS; ++i) perm[i] = i;
    for (k = 0; k < NS; ++k) {
        int piv = k;
        real best = r_fabs(G[k * NS + k]);
        for (i = k + 1; i < NS; ++i)
            if (r_fabs(G[i * NS + k]) > best) { best = r_fabs(G[i * NS + k]); piv = i; }
        if (piv != k) {
            for (j = 0; j < NS; ++j) { real tmp = G[k * NS + j]; G[k * NS + j] = G[piv * NS + j]; G[piv * NS + j] = tmp; }
            int tp = perm[k]; perm[k] = perm[piv]; perm[piv] = tp;
        }
        for (i = k + 1; i < NS; ++i) {
            G[i * NS + k] = G[i * NS + k] / G[k * NS + k];
            for (j = k + 1; j < NS; ++j) G[i * NS + j] = G[i * NS + j] - G[i * NS + k] * G[k * NS + j];
        }
    }
}

DEVICE void lu_solve(const real* LU, const int* perm, const real* b, real* x) {
    int i, j;
    for (i = 0; i < NS; ++i) x[i] = b[perm[i]];
    for (i = 0; i < NS; ++i)
        for (j = 0; j < i; ++j) x[i] = x[i] - LU[i * NS + j] * x[j];
    for (i = NS - 1; i >= 0; --i) {
        for (j = i + 1; j < NS; ++j) x[i] = x[i] - LU[i * NS + j] * x[j];
        x[i] = x[i] / LU[i * NS + i];
    }
}

/* One Rodas4 step (Hairer & Wanner; G·K form, see integrate_numpy.py). f0 = f(t, y). */
DEVICE void rodas_step(real t, const real* y, const real* p, const real* u, real h, const real* f0, real* ynew,
                       real* errv) {
    const real GAM = 0.25;
    const real ALPHA[6] = {0.0, 0.386, 0.210, 0.630, 1.0, 1.0};
    const real GI[6] = {0.25, -0.1043, 0.1035, -0.3620000000000023e-01, 0.0, 0.0};
    const real RA[15] = {0.1544000000000000e+01, 0.9466785280815826e+00, 0.2557011698983284e+00,
                         0.3314825187068521e+01, 0.2896124015972201e+01, 0.9986419139977817e+00,
                         0.1221224509226641e+01, 0.6019134481288629e+01, 0.1253708332932087e+02,
                         -0.6878860361058950e+00, 0.1221224509226641e+01, 0.6019134481288629e+01,
                         0.1253708332932087e+02, -0.6878860361058950e+00, 1.0};
    const real RC[15] = {-0.5668800000000000e+01, -0.2430093356833875e+01, -0.2063599157091915e+00,
                         -0.1073529058151375e+00, -0.9594562251023355e+01, -0.2047028614809616e+02,
                         0.7496443313967647e+01, -0.1024680431464352e+02, -0.3399990352819905e+02,
                         0.1170890893206160e+02, 0.8083246795921522e+01, -0.7981132988064893e+01,
                         -0.3152159432874371e+02, 0.1631930543123136e+02, -0.6058818238834054e+01};
    const real M[6] = {0.1221224509226641e+01, 0.6019134481288629e+01, 0.1253708332932087e+02,
                       -0.6878860361058950e+00, 1.0, 1.0};
    real G[NS * NS], Ft[NS], K[6][NS], Yi[NS], F[NS], b[NS], fp[NS];
    int perm[NS], i, j, q;
    model_jac(t, y, p, u, G);
    /* non-finite analytic columns -> forward differences; still non-finite -> 0 */
    for (j = 0; j < NS; ++j) {
        int bad = 0;
        for (i = 0; i < NS; ++i)
            if (!isfinite_r(G[i * NS + j])) bad = 1;
        if (bad) {
            real d = r_sqrt((real)TWIN_EPS) * rmax(r_fabs(y[j]), (real)1e-8);
            for (i = 0; i < NS; ++i) Yi[i] = y[i];
            Yi[j] = Yi[j] + d;
            model_rhs(t, Yi, p, u, fp);
            for (i = 0; i < NS; ++i) {
                real c = (fp[i] - f0[i]) / d;
                G[i * NS + j] = isfinite_r(c) ? c : 0;
            }
        }
    }
    model_dfdt(t, y, p, u, Ft);
    for (i = 0; i < NS; ++i)
        if (!isfinite_r(Ft[i])) Ft[i] = 0;
    for (q = 0; q < NS * NS; ++q) G[q] = -G[q];
    real inv = 1.0 / (h * GAM);
    for (i = 0; i < NS; ++i) G[i * NS + i] = G[i * NS + i] + inv;
    lu_factor(G, perm);
    for (int s = 0; s < 6; ++s) {
        const int off = (s - 1) * s / 2;
        if (s == 0) {
            for (i = 0; i < NS; ++i) F[i] = f0[i];
        } else {
            for (i = 0; i < NS; ++i) {
                real acc = y[i];
                for (j = 0; j < s; ++j) acc = acc + RA[off + j] * K[j][i];
                Yi[i] = acc;
            }
            model_rhs(t + ALPHA[s] * h, Yi, p, u, F);
        }
        for (i = 0; i < NS; ++i) {
            real acc = F[i];
            for (j = 0; j < s; ++j) acc = acc + (RC[off + j] / h) * K[j][i];
            b[i] = acc + (h * GI[s]) * Ft[i];
        }
        lu_solve(G, perm, b, K[s]);
    }
    for (i = 0; i < NS; ++i) {
        real acc = y[i];
        for (j = 0; j < 6; ++j) acc = acc + M[j] * K[j][i];
        ynew[i] = acc;
        errv[i] = K[5][i];
    }
}

DEVICE void twin_patient(int pat, int m, const real* P, int n_ev, const real* ev_t, const signed char* ev_kind,
                         const short* ev_tgt, const real* ev_val, int T, const real* times, int method,
                         real rtol, const real* atol, long long max_steps, real dt, real first_step, int n_rec,
                         const int* rec_kind, const int* rec_idx, real* out, signed char* status,
                         const real* y_init, const real* u_init, real t0, real* y_final, real* u_final) {
    /* constants are spelt in double and rounded once to `real` */
    const real C[7] = {0.0, 1.0 / 5, 3.0 / 10, 4.0 / 5, 8.0 / 9, 1.0, 1.0};
    const real A[7][6] = {
        {0, 0, 0, 0, 0, 0},
        {1.0 / 5, 0, 0, 0, 0, 0},
        {3.0 / 40, 9.0 / 40, 0, 0, 0, 0},
        {44.0 / 45, -56.0 / 15, 32.0 / 9, 0, 0, 0},
        {19372.0 / 6561, -25360.0 / 2187, 64448.0 / 6561, -212.0 / 729, 0, 0},
        {9017.0 / 3168, -355.0 / 33, 46732.0 / 5247, 49.0 / 176, -5103.0 / 18656, 0},
        {35.0 / 384, 0, 500.0 / 1113, 125.0 / 192, -2187.0 / 6784, 11.0 / 84}};
    const real E[7] = {71.0 / 57600, 0, -71.0 / 16695, 71.0 / 1920, -17253.0 / 339200, 22.0 / 525, -1.0 / 40};
    real p[NP_ARR], y[NS], u[NIN], k[7][NS], yn[NS], o[NOUT];
    /* method: 0 dopri5, 1 rk4, 2 rodas4, 3 rush_larsen */
    const int adaptive = (method == 0 || method == 2);
    const int rodas = (method == 2);
    int i, j, r;

    for (r = 0; r < n_rec; ++r)
        for (j = 0; j < T; ++j) out[OUT_AT(r, pat, j)] = TWIN_NAN;
    if (status[pat] != 0) return;
    for (i = 0; i < NP; ++i) p[i] = P[(twin_idx)i * m + pat];
    /* resume from a given state/inputs/time (segment-wise runs with controllers), or start fresh */
    if (y_init) {
        for (i = 0; i < NS; ++i) y[i] = y_init[(twin_idx)i * m + pat];
    } else {
        model_init(p, y);
    }
    for (i = 0; i < NIN; ++i) u[i] = u_init ? u_init[(twin_idx)i * m + pat] : 0;

    real t = t0, h = 0;
    int ev = 0, s = 0, k1ok = 0, code = 0;
    long long steps = 0;

/* apply due events, then record due samples (outputs are post-dose) */
#define BOUNDARY()                                                                                  \
    do {                                                                                            \
        while (EVT(ev) <= t) {                                                                      \
            twin_idx q = (twin_idx)ev * m + pat;                                                       \
            if (ev_kind[q] == 0) y[ev_tgt[q]] += ev_val[q]; else u[ev_tgt[q]] += ev_val[q];         \
            k1ok = 0;                                                                               \
            ++ev;                                                                                   \
        }                                                                                           \
        while (s < T && times[s] <= t) {                                                            \
            model_outputs(t, y, p, u, o);                                                           \
            for (r = 0; r < n_rec; ++r) out[OUT_AT(r, pat, s)] = rec_kind[r] == 0 ? o[rec_idx[r]] : y[rec_idx[r]]; \
            ++s;                                                                                    \
        }                                                                                           \
    } while (0)

#define SAVE_FINAL()                                                              \
    do {                                                                          \
        if (y_final)                                                              \
            for (i = 0; i < NS; ++i) y_final[(twin_idx)i * m + pat] = y[i];       \
        if (u_final)                                                              \
            for (i = 0; i < NIN; ++i) u_final[(twin_idx)i * m + pat] = u[i];      \
    } while (0)
    BOUNDARY();
    if (s >= T) { SAVE_FINAL(); return; }

    if (adaptive) {
        if (first_step > 0) {
            h = first_step;
        } else { /* Hairer, Nørsett & Wanner II.4 */
            real d0 = 0, d1 = 0, d2 = 0, sc;
            model_rhs(t, y, p, u, k[0]);
            for (i = 0; i < NS; ++i) {
                sc = atol[i] + rtol * r_fabs(y[i]);
                d0 += (y[i] / sc) * (y[i] / sc);
                d1 += (k[0][i] / sc) * (k[0][i] / sc);
            }
            d0 = r_sqrt(d0 / NS);
            d1 = r_sqrt(d1 / NS);
            real h0 = (d0 < 1e-5 || d1 < 1e-5) ? 1e-6 : 0.01 * d0 / rmax(d1, TWIN_TINY);
            for (i = 0; i < NS; ++i) yn[i] = y[i] + h0 * k[0][i];
            model_rhs(t + h0, yn, p, u, k[1]);
            for (i = 0; i < NS; ++i) {
                sc = atol[i] + rtol * r_fabs(y[i]);
                d2 += ((k[1][i] - k[0][i]) / sc) * ((k[1][i] - k[0][i]) / sc);
            }
            d2 = r_sqrt(d2 / NS) / h0;
            real dm = rmax(d1, d2);
            real h1 = dm <= 1e-15 ? rmax(1e-6, h0 * 1e-3) : r_pow(0.01 / rmax(dm, TWIN_TINY), 0.2);
            h = rmin(100 * h0, h1);
        }
    } else {
        h = dt;
    }

    for (;;) {
        real stop = rmin(EVT(ev), times[s]);
        real gap = stop - t, hi = h;
        int hit = hi >= gap;
        real hs = hit ? gap : hi, h_next;
        int ok;
        if (!k1ok) {
            model_rhs(t, y, p, u, k[0]);
            k1ok = 1;
        }
        for (i = 0; i < NS; ++i)
            if (!isfinite_r(k[0][i])) { code = 1; goto fail; }
        if (rodas) {
            real errv[NS], err = 0;
            rodas_step(t, y, p, u, hs, k[0], yn, errv);
            int fin = 1;
            for (i = 0; i < NS; ++i) {
                real sc = atol[i] + rtol * rmax(r_fabs(y[i]), r_fabs(yn[i]));
                err += (errv[i] / sc) * (errv[i] / sc);
                if (!isfinite_r(yn[i])) fin = 0;
            }
            err = r_sqrt(err / NS);
            if (!isfinite_r(err) || !fin) err = TWIN_INF;
            ok = err <= 1.0;
            real fac = err == 0 ? 6.0 : rmin(rmax(0.9 * r_pow(rmax(err, TWIN_TINY), -0.25), 0.2), 6.0);
            if (!ok) fac = rmin(fac, 1.0);
            h_next = hs * fac;
            if (ok && hit) h_next = rmax(h_next, hi);
        } else if (method == 3) {
            real bb[NS];
            model_rl_b(t, y, p, u, bb);
            ok = 1;
            for (i = 0; i < NS; ++i) {
                real z = bb[i] * hs;
                real phi = r_fabs(z) < 1e-8 ? 1.0 + 0.5 * z : r_expm1(z) / z;
                yn[i] = y[i] + hs * (k[0][i] * phi);
                if (!isfinite_r(yn[i])) ok = 0;
            }
            h_next = hi;
        } else if (adaptive) {
/* stages written out (same operation order as the NumPy reference, zero weights skipped) so the
 * compiler sees straight-line code with literal coefficients */
#define STAGE(st, ACC)                                   \
            for (i = 0; i < NS; ++i) {                    \
                real acc = y[i];                          \
                ACC;                                      \
                yn[i] = acc;                              \
            }                                             \
            model_rhs(t + C[st] * hs, yn, p, u, k[st]);
#define T_(st, j) acc += (hs * A[st][j]) * k[j][i]
            STAGE(1, T_(1, 0))
            STAGE(2, T_(2, 0); T_(2, 1))
            STAGE(3, T_(3, 0); T_(3, 1); T_(3, 2))
            STAGE(4, T_(4, 0); T_(4, 1); T_(4, 2); T_(4, 3))
            STAGE(5, T_(5, 0); T_(5, 1); T_(5, 2); T_(5, 3); T_(5, 4))
            STAGE(6, T_(6, 0); T_(6, 2); T_(6, 3); T_(6, 4); T_(6, 5))
#undef T_
#undef STAGE
            real err = 0;
            for (i = 0; i < NS; ++i) {
                real e = 0;
                e += E[0] * k[0][i];
                e += E[2] * k[2][i];
                e += E[3] * k[3][i];
                e += E[4] * k[4][i];
                e += E[5] * k[5][i];
                e += E[6] * k[6][i];
                e = hs * e;
                real sc = atol[i] + rtol * rmax(r_fabs(y[i]), r_fabs(yn[i]));
                err += (e / sc) * (e / sc);
            }
            err = r_sqrt(err / NS);
            if (!isfinite_r(err)) err = TWIN_INF;
            ok = err <= 1.0;
            real fac = err == 0 ? 5.0 : rmin(rmax(0.9 * r_exp(-0.2 * r_log(rmax(err, TWIN_TINY))), 0.2), 5.0);
            if (!ok) fac = rmin(fac, 1.0);
            h_next = hs * fac;
            if (ok && hit) h_next = rmax(h_next, hi);
        } else {
            real tmp[NS];
            for (i = 0; i < NS; ++i) tmp[i] = y[i] + (hs / 2) * k[0][i];
            model_rhs(t + hs / 2, tmp, p, u, k[1]);
            for (i = 0; i < NS; ++i) tmp[i] = y[i] + (hs / 2) * k[1][i];
            model_rhs(t + hs / 2, tmp, p, u, k[2]);
            for (i = 0; i < NS; ++i) tmp[i] = y[i] + hs * k[2][i];
            model_rhs(t + hs, tmp, p, u, k[3]);
            ok = 1;
            for (i = 0; i < NS; ++i) {
                yn[i] = y[i] + (hs / 6) * (k[0][i] + 2 * k[1][i] + 2 * k[2][i] + k[3][i]);
                if (!isfinite_r(yn[i])) ok = 0;
            }
            h_next = hi;
        }
        ++steps;
        if (ok) {
            t = hit ? stop : t + hs;
            for (i = 0; i < NS; ++i) y[i] = yn[i];
            if (adaptive && !rodas) {
                for (i = 0; i < NS; ++i) k[0][i] = k[6][i];
                k1ok = 1;
            } else {
                k1ok = 0;
            }
        }
        h = h_next;
        if (ok)
            for (i = 0; i < NS; ++i)
                if (!isfinite_r(y[i])) { code = 1; goto fail; }
        if (!adaptive && !ok) { code = 1; goto fail; }
        if (adaptive && !ok && h < TWIN_HMIN * rmax(r_fabs(t), 1.0)) { code = 2; goto fail; }
        if (steps >= max_steps) { code = 3; goto fail; }
        if (ok && hit) {
            BOUNDARY();
            if (s >= T) { SAVE_FINAL(); return; }
        }
    }
fail:
    status[pat] = (signed char)code;
    for (r = 0; r < n_rec; ++r)
        for (j = 0; j < T; ++j) out[OUT_AT(r, pat, j)] = TWIN_NAN;
    for (i = 0; i < NS; ++i) y[i] = TWIN_NAN;
    SAVE_FINAL();
}

#ifdef KERNEL_CUDA
extern "C" __global__ void twin_run_cuda(int m, const real* P, int n_ev, const real* ev_t, const signed char* ev_kind,
                                         const short* ev_tgt, const real* ev_val, int T, const real* times, int method,
                                         real rtol, const real* atol, long long max_steps, real dt, real first_step,
                                         int n_rec, const int* rec_kind, const int* rec_idx, real* out,
                                         signed char* status, const real* y_init, const real* u_init, real t0,
                                         real* y_final, real* u_final) {
    int pat = blockIdx.x * blockDim.x + threadIdx.x;
    if (pat < m)
        twin_patient(pat, m, P, n_ev, ev_t, ev_kind, ev_tgt, ev_val, T, times, method, rtol, atol, max_steps, dt,
                     first_step, n_rec, rec_kind, rec_idx, out, status, y_init, u_init, t0, y_final, u_final);
}
#else
int twin_run(int m, const real* P, int n_ev, const real* ev_t, const signed char* ev_kind, const short* ev_tgt,
             const real* ev_val, int T, const real* times, int method, real rtol, const real* atol,
             long long max_steps, real dt, real first_step, int n_rec, const int* rec_kind, const int* rec_idx,
             real* out, signed char* status, const real* y_init, const real* u_init, real t0, real* y_final,
             real* u_final, int n_threads) {
    int pat;
    (void)n_threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 8) num_threads(n_threads)
#endif
    for (pat = 0; pat < m; ++pat)
        twin_patient(pat, m, P, n_ev, ev_t, ev_kind, ev_tgt, ev_val, T, times, method, rtol, atol, max_steps, dt,
                     first_step, n_rec, rec_kind, rec_idx, out, status, y_init, u_init, t0, y_final, u_final);
    return 0;
}
int twin_abi_version(void) { return 2; }
#endif
