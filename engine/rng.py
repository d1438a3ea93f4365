"""Counter-based random numbers: Philox4x32-10, vectorised in NumPy.

Why counter-based: a patient's random numbers are a pure function of
(job seed, stream, patient index, draw number), so a cohort is bit-identical whatever the chunk
size, the rank count or the order in which chunks are computed. There is no generator state to
carry between chunks, save, or split.

Why Philox4x32-10: it is the generator of Random123 (Salmon et al., SC'11) and of cuRAND
(``curandStatePhilox4_32_10_t``), uses only 32x32->64 bit multiplies and XORs, and so can be
reproduced bit-for-bit by the C/OpenMP and CUDA kernels.

Layout (the contract a C/CUDA re-implementation must follow):

* key     = (seed & 0xffffffff, seed >> 32)                      -- 64-bit job seed
* counter = (index & 0xffffffff, index >> 32, stream, block)     -- 64-bit patient index
* one block gives 4 words r0..r3; draw ``d`` uses block ``d // 2`` and the word pair
  (r0, r1) when ``d`` is even, (r2, r3) when odd.
* a word pair (lo, hi) becomes x = (hi << 32 | lo) >> 12, a 52-bit integer, and
  u = (x + 0.5) * 2**-52.  Every such u is exactly representable, so
  2**-53 <= u <= 1 - 2**-53: 0 and 1 can never occur (inverse CDFs stay finite) and the
  result is the same in any IEEE-754 double arithmetic. This is Random123's
  ``u01fixedpt_open_open_64_double`` (u01fixedpt.h) applied to hi << 32 | lo; see ``uniform``
  for why not 53 bits.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

# Named streams: one per purpose, so adding draws to one purpose never shifts another.
STREAM_COVARIATES = 1
STREAM_IIV = 2
STREAM_ARM = 3
STREAM_RESIDUAL = 4  # reserved: residual / observation error
STREAM_SENSOR = 5  # reserved: sensor noise (e.g. CGM)
STREAM_BLOCKS = 6  # trial randomisation: permutation of each block (keyed by stratum and block number)
STREAM_MEALS = 7  # randomised meal times and sizes (keyed by patient index)
# 6..15 reserved for engine use; models may use 16 and above.

# Philox4x32 constants (Random123 philox.h)
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_ROUNDS = 10

# Rows of counters processed at once inside `uniform`: bounds temporaries to a few tens of MB
# and keeps them in cache-friendly sizes, whatever the chunk size.
_BATCH = 1 << 16


def _philox_words(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on four uint64 arrays holding 32-bit words; returns 4 arrays (uint64)."""
    mask = np.uint64(_MASK32)
    s32 = np.uint64(32)
    for r in range(_ROUNDS):
        if r:  # key schedule: bump before every round but the first (Random123 order)
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = c0 * _M0  # < 2**64: exact in uint64
        p1 = c2 * _M1
        n0 = (p1 >> s32) ^ c1 ^ np.uint64(k0)
        n2 = (p0 >> s32) ^ c3 ^ np.uint64(k1)
        p1 &= mask
        p0 &= mask
        c0, c1, c2, c3 = n0, p1, n2, p0
    return c0, c1, c2, c3


def philox4x32_10(counter, key) -> np.ndarray:
    """Raw Philox4x32-10 bijection.

    counter: array-like (..., 4) of uint32 words; key: (2,) uint32 words.
    Returns (..., 4) uint32, word order as in Random123 (``ctr.v[0..3]``).
    """
    ctr = np.asarray(counter, dtype=np.uint64)
    if ctr.shape[-1:] != (4,):
        raise ValueError(f"counter must have a trailing dimension of 4, got shape {ctr.shape}")
    if np.any(ctr > _MASK32):
        raise ValueError("counter words must be 32-bit")
    k0, k1 = (int(k) for k in key)
    if not (0 <= k0 <= _MASK32 and 0 <= k1 <= _MASK32):
        raise ValueError("key words must be 32-bit")
    out = _philox_words(ctr[..., 0], ctr[..., 1], ctr[..., 2], ctr[..., 3], k0, k1)
    return np.stack(out, axis=-1).astype(np.uint32)


def _check(seed: int, stream: int, index, n: int, offset: int) -> np.ndarray:
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= int(stream) <= _MASK32:
        raise ValueError(f"stream must be a 32-bit unsigned integer, got {stream}")
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be >= 0, got n={n}, offset={offset}")
    if (offset + n + 1) // 2 > 2**32:
        raise ValueError("more than 2**33 draws per (patient, stream)")
    idx = np.asarray(index)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("index must be a 1-D integer array")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and idx.min() < 0:
        raise ValueError("patient indices must be >= 0")
    return idx


def uniform(seed: int, stream: int, index: np.ndarray, n: int, *, offset: int = 0) -> np.ndarray:
    """Uniforms strictly inside (0, 1), shape (len(index), n), float64.

    Entry [i, j] is draw number ``offset + j`` of patient ``index[i]`` on ``stream``: it depends
    on nothing else, so any subset or ordering of patients gives the same values.

    Resolution is 52 bits, spaced 2**-52 apart at the midpoints (k + 0.5) * 2**-52. 53 evenly
    spaced bits cannot be strictly inside (0, 1): the midpoints (k + 0.5) * 2**-53 just below 1
    need 54 significant bits and round to 1.0.
    """
    idx = _check(seed, stream, index, n, offset)
    m = idx.size
    out = np.empty((m, n), dtype=np.float64)
    if m == 0 or n == 0:
        return out
    seed = int(seed)
    k0, k1 = seed & _MASK32, seed >> 32
    first_block = offset // 2
    n_blocks = (offset + n - 1) // 2 - first_block + 1
    blocks = np.arange(first_block, first_block + n_blocks, dtype=np.uint64)
    u64 = idx.view(np.uint64)  # idx >= 0, so the bit pattern is the value
    s32, mask = np.uint64(32), np.uint64(_MASK32)
    for a in range(0, m, _BATCH):
        part = u64[a : a + _BATCH]
        rows = part.size
        c0 = np.repeat(part & mask, n_blocks)
        c1 = np.repeat(part >> s32, n_blocks)
        c2 = np.full(rows * n_blocks, np.uint64(stream))
        c3 = np.tile(blocks, rows)
        r0, r1, r2, r3 = _philox_words(c0, c1, c2, c3, k0, k1)
        # two draws per block: (r0, r1) then (r2, r3); interleave to draw order
        u = np.empty((rows, n_blocks, 2), dtype=np.float64)
        u[:, :, 0] = words_to_uniform(r0, r1).reshape(rows, n_blocks)
        u[:, :, 1] = words_to_uniform(r2, r3).reshape(rows, n_blocks)
        skip = offset - 2 * first_block
        out[a : a + rows] = u.reshape(rows, 2 * n_blocks)[:, skip : skip + n]
    return out


def words_to_uniform(lo, hi) -> np.ndarray:
    """Two 32-bit words -> float64 in [2**-53, 1 - 2**-53]: ((hi<<32 | lo) >> 12) + 0.5) * 2**-52.

    All steps are exact in IEEE-754 double, so C and CUDA give the same bits.
    """
    lo = np.asarray(lo, dtype=np.uint64)
    hi = np.asarray(hi, dtype=np.uint64)
    x = ((hi << np.uint64(32)) | lo) >> np.uint64(12)
    u = x.astype(np.float64)  # < 2**52: exact conversion
    u += 0.5
    u *= 2.0**-52
    return u


def normal(seed: int, stream: int, index: np.ndarray, n: int, *, offset: int = 0) -> np.ndarray:
    """Standard normals by inverse CDF of `uniform` (finite: |z| < 8.3).

    Inverse CDF, not Box-Muller: one uniform per normal keeps the Gaussian-copula construction
    exact (u -> z -> u round-trips) and a draw's meaning independent of its neighbours.
    """
    return ndtri(uniform(seed, stream, index, n, offset=offset))
