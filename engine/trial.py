"""Trial design: screening (inclusion/exclusion), randomisation to arms, subgroup definitions.

Simple randomisation draws each patient's arm from its own stream (engine.cohort). Stratified
randomisation uses permuted blocks within strata: screened-in patients of a stratum, in patient
index order, fill blocks of `block_size`; each block is a random permutation (keyed by seed,
stratum and block number) of the arms repeated by their allocation weights. The assignment is
computed once for the whole cohort on every rank (covariates only, in blocks), so it does not
depend on chunk size or on the number of ranks.
"""

from __future__ import annotations

import numpy as np

from . import rng
from .config import Job, TrialSection
from .errors import JobError

STREAM_BLOCKS = rng.STREAM_BLOCKS
NOT_RANDOMISED = -1


def band_codes(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Band index of each value for edges e0 < e1 < ... (band k is [e_k, e_k+1)); -1 outside or NaN."""
    v = np.asarray(values, float)
    k = np.searchsorted(np.asarray(edges, float), v, side="right") - 1
    k[(v < edges[0]) | (v >= edges[-1]) | ~np.isfinite(v)] = -1
    # the top edge is inclusive, so a band [a, b] can hold the bound of a truncated distribution
    k[v == edges[-1]] = len(edges) - 2
    return k.astype(np.int64)


def band_labels(name: str, edges: list[float]) -> list[str]:
    f = lambda x: f"{x:g}"  # noqa: E731
    return [f"{name} {f(a)}–{f(b)}" for a, b in zip(edges, edges[1:])]


def _criterion_mask(c, covs: dict, categories: dict) -> np.ndarray:
    x = covs[c.covariate]
    if c.categories is not None:
        cats = categories.get(c.covariate)
        if cats is None:
            raise JobError(f"key 'trial' criterion on {c.covariate!r}: 'in' needs a categorical covariate")
        unknown = [v for v in c.categories if v not in cats]
        if unknown:
            raise JobError(f"key 'trial' criterion on {c.covariate!r}: categories {unknown} not in {cats}")
        codes = [cats.index(v) for v in c.categories]
        return np.isin(x, codes)
    x = np.asarray(x, float)
    ok = np.isfinite(x)
    if c.min is not None:
        ok &= x >= c.min
    if c.max is not None:
        ok &= x <= c.max
    return ok


def screen(trial: TrialSection, covs: dict, categories: dict) -> np.ndarray:
    """True for patients that meet every inclusion criterion and no exclusion criterion."""
    n = len(next(iter(covs.values()))) if covs else 0
    inc = np.ones(n, bool)
    for c in trial.inclusion:
        inc &= _criterion_mask(c, covs, categories)
    for c in trial.exclusion:
        inc &= ~_criterion_mask(c, covs, categories)
    return inc


def _block_pattern(job: Job) -> np.ndarray:
    w = np.array([a.allocation for a in job.arms], float)
    ratio = w / w.min()
    if not np.allclose(ratio, np.round(ratio), atol=1e-9):
        raise JobError(f"key 'arms[].allocation' = {w.tolist()}: stratified blocks need allocation weights in "
                       "integer ratios (e.g. 1:1, 2:1)")
    pattern = np.repeat(np.arange(len(w)), np.round(ratio).astype(int))
    b = job.trial.block_size or len(pattern)
    if b % len(pattern):
        raise JobError(f"key 'trial.block_size' = {b}: must be a multiple of {len(pattern)} "
                       f"(arms repeated by their allocation ratio)")
    return np.tile(pattern, b // len(pattern))


def stratum_codes(trial: TrialSection, covs: dict, categories: dict) -> np.ndarray:
    code = np.zeros(len(next(iter(covs.values()))), np.int64)
    for name in trial.strata:
        if name in categories:
            c, k = np.asarray(covs[name], np.int64), len(categories[name])
        else:
            edges = trial.subgroups[name]
            c, k = band_codes(covs[name], edges), len(edges) - 1
        c = np.where(c < 0, k, c)  # out-of-band values get a stratum of their own
        code = code * (k + 1) + c
    return code


def stratified_assignment(job: Job, cohort, block_rows: int = 200_000) -> np.ndarray:
    """Arm of every patient (int16; NOT_RANDOMISED for screen failures), for the whole cohort."""
    trial = job.trial
    n = cohort.n
    strata = np.empty(n, np.int64)
    included = np.empty(n, bool)
    for s in range(0, n, block_rows):
        ch = cohort.chunk(s, min(s + block_rows, n))
        strata[s:s + len(ch.index)] = stratum_codes(trial, ch.covariates, cohort.categories)
        included[s:s + len(ch.index)] = screen(trial, ch.covariates, cohort.categories) & (ch.status == 0)
    pattern = _block_pattern(job)
    B = len(pattern)
    arm = np.full(n, NOT_RANDOMISED, np.int16)
    idx = np.nonzero(included)[0]
    for st in np.unique(strata[idx]):
        members = idx[strata[idx] == st]  # in patient-index order
        pos = np.arange(len(members))
        blocks = np.unique(pos // B)
        keys = (np.int64(st) << np.int64(32)) + blocks.astype(np.int64)
        u = rng.uniform(job.job.seed, STREAM_BLOCKS, keys, B)  # [n_blocks, B]
        perms = np.argsort(u, axis=1, kind="stable")
        arm[members] = pattern[perms[pos // B, pos % B]]
    return arm
