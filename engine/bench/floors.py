"""The machine's floors, measured here rather than taken from a data sheet.

* FLOP/s: a compiled C loop (kernels.compile.build_shared_library, -O3 -march=native) of
  independent fused multiply-adds, 12 chains per thread so the FMA latency is hidden; one FMA is
  counted as 2 flops. Two variants: `vector` uses the widest SIMD the compiler targets here
  (AVX-512: 8 doubles, AVX2: 4, else scalar) and is the machine's floor; `scalar` uses one double
  per FMA, the shape of our per-patient kernels (one patient per thread, no SIMD across patients).
  Each is measured on 1 thread and on all threads (OpenMP).
* Memory bandwidth: a compiled OpenMP copy of two large arrays (each far above the last-level
  cache), bytes = read + written (the write-allocate read of the destination is not counted), best
  of several passes. NumPy's single-threaded `np.copyto` is reported beside it.
* BLAS: NumPy float64 matmul (2n^3 flops), for reference only; it is not used as a floor.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np

_SRC = r"""
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 8
typedef __m512d vd;
#define VSET(x) _mm512_set1_pd(x)
#define VFMA(a, b, c) _mm512_fmadd_pd(a, b, c)
static double vsum(vd a) { return _mm512_reduce_add_pd(a); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 4
typedef __m256d vd;
#define VSET(x) _mm256_set1_pd(x)
#define VFMA(a, b, c) _mm256_fmadd_pd(a, b, c)
static double vsum(vd a) { double t[4]; _mm256_storeu_pd(t, a); return t[0] + t[1] + t[2] + t[3]; }
#else
#define VW 1
typedef double vd;
#define VSET(x) (x)
#define VFMA(a, b, c) fma(a, b, c)
static double vsum(vd a) { return a; }
#endif

int twin_vector_width(void) { return VW; }

#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* n_iter x 12 chains x VW lanes x 2 flops per thread; returns a checksum so nothing is elided */
double twin_fma_vector(long n_iter, int threads) {
    double total = 0.0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+:total)
#endif
    {
        const vd m = VSET(0.9999999), c = VSET(1e-7);
#define DECL(i) vd a##i = VSET(1.0 + 0.01 * i);
        CHAINS(DECL)
        for (long k = 0; k < n_iter; k++) {
#define STEP(i) a##i = VFMA(a##i, m, c);
            CHAINS(STEP)
        }
#define SUM(i) total += vsum(a##i);
        CHAINS(SUM)
    }
    return total;
}

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize", "no-tree-slp-vectorize")))
#endif
double twin_fma_scalar(long n_iter, int threads) {
    double total = 0.0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+:total)
#endif
    {
        const double m = 0.9999999, c = 1e-7;
#define SDECL(i) double s##i = 1.0 + 0.01 * i;
        CHAINS(SDECL)
        for (long k = 0; k < n_iter; k++) {
#define SSTEP(i) s##i = fma(s##i, m, c);
            CHAINS(SSTEP)
        }
#define SSUM(i) total += s##i;
        CHAINS(SSUM)
    }
    return total;
}

/* dst <- src, n doubles, split over threads */
void twin_copy(double *dst, const double *src, long n, int threads) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        long lo = n * id / nt, hi = n * (id + 1) / nt;
        memcpy(dst + lo, src + lo, (size_t)(hi - lo) * sizeof(double));
    }
#else
    (void)threads;
    memcpy(dst, src, (size_t)n * sizeof(double));
#endif
}
"""

CHAINS = 12
_lib = None


def _load():
    global _lib
    if _lib is None:
        from kernels.compile import build_shared_library

        lib = ctypes.CDLL(str(build_shared_library(_SRC, "twin_bench_floors")))
        lib.twin_vector_width.restype = ctypes.c_int
        for f in (lib.twin_fma_vector, lib.twin_fma_scalar):
            f.restype = ctypes.c_double
            f.argtypes = [ctypes.c_long, ctypes.c_int]
        lib.twin_copy.restype = None
        lib.twin_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
        _lib = lib
    return _lib


def _best(fn, seconds: float, reps: int = 5) -> tuple[int, float]:
    """Smallest wall time of `reps` calls of fn(n) after calibrating n to ~`seconds` per call."""
    n = 1 << 14
    while True:  # min of two calls: a descheduled vCPU only ever makes a call slower
        dt = min(_timed(fn, n) for _ in range(2))
        if dt > seconds / 4 or n > 1 << 40:
            break
        n *= 4
    n = max(1, int(n * max(seconds, 0.03) / max(dt, 1e-9)))
    best = min(_timed(fn, n) for _ in range(reps))
    return n, best


def _timed(fn, n) -> float:
    t = time.perf_counter()
    fn(n)
    return time.perf_counter() - t


def flop_floor(threads: int, seconds: float = 0.3) -> dict:
    """GFLOP/s of independent FMAs: vector and scalar, 1 thread and `threads` threads."""
    lib = _load()
    vw = lib.twin_vector_width()
    out = {"method": f"compiled C loop of independent FMAs ({CHAINS} chains/thread, 2 flops per FMA, "
                     f"-O3 -march=native); vector = {vw} doubles per FMA", "vector_width_doubles": vw,
           "threads": threads}
    for kind, f, lanes in (("vector", lib.twin_fma_vector, vw), ("scalar", lib.twin_fma_scalar, 1)):
        for nt in sorted({1, threads}):
            n, dt = _best(lambda k, f=f, nt=nt: f(k, nt), seconds)
            out[f"{kind}_{nt}t_gflops"] = 2.0 * CHAINS * lanes * n * nt / dt / 1e9
    out["vector_gflops"] = out[f"vector_{threads}t_gflops"]
    out["vector_per_core_gflops"] = out["vector_1t_gflops"]
    out["scalar_gflops"] = out[f"scalar_{threads}t_gflops"]
    out["scalar_per_core_gflops"] = out["scalar_1t_gflops"]
    return out


def memory_floor(threads: int, mbytes: int = 256, reps: int = 5) -> dict:
    """GB/s of a large copy (read + write bytes), compiled OpenMP and NumPy single-threaded."""
    lib = _load()
    n = max(1, mbytes * (1 << 20) // 8)
    src = np.ones(n)
    dst = np.empty(n)
    dst[:] = 0.0  # touch every page before timing
    best = {}
    for nt in sorted({1, threads}):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            lib.twin_copy(dst.ctypes.data, src.ctypes.data, n, nt)
            ts.append(time.perf_counter() - t)
        best[nt] = min(ts)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t)
    nb = 2 * 8 * n
    return {"method": f"copy of a {mbytes} MiB float64 array (memcpy split over OpenMP threads), "
                      f"bytes = read + written, best of {reps}",
            "array_mib": mbytes, "threads": threads,
            "copy_gbs": nb / best[threads] / 1e9, "copy_1t_gbs": nb / best[1] / 1e9,
            "numpy_copy_1t_gbs": nb / min(ts) / 1e9}


def blas_gflops(n: int = 2048, reps: int = 3) -> dict:
    a = np.random.default_rng(0).random((n, n))
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda _: a @ b, 0) for _ in range(reps))
    return {"method": f"numpy float64 matmul {n}x{n} (2n^3 flops), best of {reps}; reference only",
            "n": n, "gflops": 2.0 * n ** 3 / best / 1e9,
            "threads_env": os.environ.get("OPENBLAS_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "default"))}


def measure(threads: int, seconds: float, mem_mib: int, blas_n: int | None) -> dict:
    out = {"flops": flop_floor(threads, seconds), "memory": memory_floor(threads, mem_mib)}
    if blas_n:
        out["blas"] = blas_gflops(blas_n)
    f, m = out["flops"], out["memory"]
    # roofline ridge: flops per byte above which a code is bound by arithmetic, not memory
    out["machine_balance_flop_per_byte"] = f["vector_gflops"] / m["copy_gbs"]
    return out
