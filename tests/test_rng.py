"""engine.rng: Philox4x32-10 against Random123's known answers, then the uniform/normal layer."""

import numpy as np
import pytest
from scipy import stats

from engine import rng

# Known-answer vectors, format "counter[4] key[2] -> output[4]" (hex uint32 words).
# The first three are the philox4x32 10-round lines of Random123's tests/kat_vectors
# (DEShawResearch/random123); the others are 10-round lines of the extended set in
# girving/random123-manual examples/kat_vectors (single-bit / pi-digit counters and keys).
KAT = """
00000000 00000000 00000000 00000000  00000000 00000000  6627e8d5 e169c58d bc57ac4c 9b00dbd8
ffffffff ffffffff ffffffff ffffffff  ffffffff ffffffff  408f276d 41c83b0e a20bc7c6 6d5451fd
243f6a88 85a308d3 13198a2e 03707344  a4093822 299f31d0  d16cfe09 94fdcceb 5001e420 24126ea1
00000001 00000000 00000000 00000000  00000001 00000000  ac08141b dfc5ccbe 79c07a47 a7f66093
00000000 00000000 00000000 00000001  00000001 00000000  127bee41 1e047488 48842b20 0a393496
243f6a88 85a308d3 13198a2e 03707344  00000000 ffffffff  08f7720c 845ee9e0 502ccd3d a9a00e27
00000000 00000000 00000000 80000000  00000000 80000000  f7a0b371 e51dc93d 56ce135d 1d4b5580
452821e6 38d01377 be5466cf 34e90c6c  00000000 80000000  94ca5566 14924b2f 28214292 59faeaee
"""


def _kat():
    for line in KAT.strip().splitlines():
        w = [int(x, 16) for x in line.split()]
        yield w[:4], w[4:6], w[6:]


@pytest.mark.parametrize("ctr,key,want", list(_kat()))
def test_philox_known_answers(ctr, key, want):
    got = rng.philox4x32_10(np.array(ctr, dtype=np.uint32), key)
    assert got.dtype == np.uint32
    assert [int(x) for x in got] == want


def test_philox_vectorised_matches_scalar():
    cases = list(_kat())
    # batch with one key: all counters of the vectors that share key (0, 0x80000000)
    ctrs = np.array([c for c, k, _ in cases if k == [0, 0x80000000]], dtype=np.uint32)
    want = np.array([w for c, k, w in cases if k == [0, 0x80000000]], dtype=np.uint32)
    assert len(ctrs) == 2
    np.testing.assert_array_equal(rng.philox4x32_10(ctrs, (0, 0x80000000)), want)


def test_uniform_layout_contract():
    """uniform() is exactly the documented counter/key/word layout (what C/CUDA must match)."""
    seed = (0x0123ABCD << 32) | 0x89ABCDEF
    idx = np.array([0, 5, 2**32 + 7, 2**40 + 3], dtype=np.int64)
    u = rng.uniform(seed, 9, idx, 5)
    for i, p in enumerate(idx):
        p = int(p)
        for d in range(5):
            ctr = [p & 0xFFFFFFFF, p >> 32, 9, d // 2]
            r = rng.philox4x32_10(np.array(ctr, dtype=np.uint32), (0x89ABCDEF, 0x0123ABCD))
            lo, hi = (r[0], r[1]) if d % 2 == 0 else (r[2], r[3])
            want = ((((int(hi) << 32) | int(lo)) >> 12) + 0.5) * 2.0**-52
            assert u[i, d] == want


def test_words_to_uniform_never_hits_0_or_1():
    lo = np.array([0, 0xFFFFFFFF, 0xFFF, 0x1000], dtype=np.uint32)
    hi = np.array([0, 0xFFFFFFFF, 0, 0], dtype=np.uint32)
    u = rng.words_to_uniform(lo, hi)
    assert u[0] == 2.0**-53 > 0
    assert u[1] == 1 - 2.0**-53 and u[1] < 1
    assert u[2] == u[0]  # the 12 low bits are dropped
    assert u[3] - u[2] == 2.0**-52
    assert np.all(np.isfinite(stats.norm.ppf(u)))


def test_uniform_open_interval_and_ks():
    u = rng.uniform(2024, rng.STREAM_COVARIATES, np.arange(50_000), 4)
    assert u.shape == (50_000, 4) and u.dtype == np.float64
    assert np.all((u > 0) & (u < 1))
    for j in range(4):
        assert stats.kstest(u[:, j], "uniform").pvalue > 1e-3
    # columns (draws) and rows (patients) are not correlated: |r| < 4 standard errors
    r = np.corrcoef(u.T)[np.triu_indices(4, 1)]
    assert np.all(np.abs(r) < 4 / np.sqrt(50_000))
    lag = np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]
    assert abs(lag) < 4 / np.sqrt(50_000)


def test_uniform_depends_only_on_patient_and_draw():
    idx = np.arange(70_000, dtype=np.int64)  # longer than the internal batch of 2**16 rows
    full = rng.uniform(7, 2, idx, 5)
    perm = np.random.default_rng(0).permutation(idx)
    np.testing.assert_array_equal(rng.uniform(7, 2, perm, 5), full[perm])
    np.testing.assert_array_equal(rng.uniform(7, 2, idx[65_530:65_540], 5), full[65_530:65_540])
    # a draw does not depend on how many draws are asked for, or where the request starts
    np.testing.assert_array_equal(rng.uniform(7, 2, idx[:100], 2), full[:100, :2])
    np.testing.assert_array_equal(rng.uniform(7, 2, idx[:100], 3, offset=2), full[:100, 2:5])
    np.testing.assert_array_equal(rng.uniform(7, 2, idx[:100], 1, offset=3), full[:100, 3:4])


def test_seed_stream_and_high_index_words_all_matter():
    idx = np.arange(1000, dtype=np.int64)
    base = rng.uniform(1, 1, idx, 2)
    for other in (
        rng.uniform(2, 1, idx, 2),  # seed low word
        rng.uniform(1 + 2**32, 1, idx, 2),  # seed high word
        rng.uniform(1, 2, idx, 2),  # stream
        rng.uniform(1, 1, idx + 2**32, 2),  # patient index high word
    ):
        assert not np.any(other == base)
        assert abs(np.corrcoef(other[:, 0], base[:, 0])[0, 1]) < 4 / np.sqrt(1000)


def test_normal_moments_and_ks():
    n = 200_000
    z = rng.normal(99, rng.STREAM_IIV, np.arange(n), 1)[:, 0]
    assert np.all(np.isfinite(z))
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # 4 standard errors: mean 1/sqrt(n), variance sqrt(2/n), skew sqrt(6/n), excess kurtosis sqrt(24/n)
    assert abs(z.mean()) < 4 / np.sqrt(n)
    assert abs(z.var() - 1) < 4 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 4 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 4 * np.sqrt(24 / n)


def test_normal_is_inverse_cdf_of_uniform():
    idx = np.arange(100)
    u = rng.uniform(3, 4, idx, 3)
    np.testing.assert_array_equal(rng.normal(3, 4, idx, 3), stats.norm.ppf(u))


def test_bad_arguments():
    with pytest.raises(ValueError):
        rng.uniform(1, 1, np.array([-1]), 1)
    with pytest.raises(ValueError):
        rng.uniform(-1, 1, np.arange(3), 1)
    with pytest.raises(ValueError):
        rng.uniform(1, 2**32, np.arange(3), 1)
    with pytest.raises(ValueError):
        rng.uniform(1, 1, np.array([0.5]), 1)
    assert rng.uniform(1, 1, np.arange(3), 0).shape == (3, 0)
    assert rng.uniform(1, 1, np.arange(0), 4).shape == (0, 4)


def test_stream_numbers_are_distinct():
    """Every consumer of random numbers has its own stream: two sharing one would draw correlated
    numbers for the same (seed, key)."""
    from engine import rng as r

    streams = {k: v for k, v in vars(r).items() if k.startswith("STREAM_")}
    assert len(streams) >= 7 and len(set(streams.values())) == len(streams), streams
