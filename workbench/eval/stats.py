"""Uncertainty of scores on a few hundred examples: standard errors and paired tests between two runs.

- `stderr`: the standard error of a mean over examples, as lm-eval computes it (`mean_stderr`: sample
  standard deviation, n - 1, over sqrt(n)); for exact match (0/1) that is sqrt(p (1 - p) / (n - 1)).
- `mcnemar`: two runs scored on the same examples with a 0/1 metric: the exact two-sided binomial test on
  the discordant pairs (b = A right and B wrong, c = the reverse; p = min(1, 2 P[X <= min(b, c)]), X ~
  Bin(b + c, 1/2)); only the examples where the two disagree carry information.
- `paired_bootstrap`: the same question for continuous per-example metrics (a per-example f1, a log-likelihood):
  resample the examples with replacement (numpy's PCG64, seeded: the same inputs give the same p), two-sided p of
  the mean difference changing sign, p = min(1, 2 (1 + #resamples on the other side of 0) / (iters + 1)) — never
  0 from finitely many resamples.
- `corpus_aggregate`, `corpus_stderr`, `paired_corpus_test`: corpus-level perplexity-like scores from
  per-document (log-likelihood, weight) pairs (lm-eval's `weighted_perplexity` exp(-Σll/Σw) and `bits_per_byte`
  -Σll/Σw/ln 2): the aggregate, its standard error by bootstrap over documents (the standard deviation of the
  aggregate over resampled corpora), and a paired permutation test over documents of the difference of two models'
  aggregates (A and B swapped on subsets of documents: exact over all 2^n swaps up to 16 documents, seeded random
  swaps beyond), whose p is never smaller than a few documents can support (`paired_corpus_bootstrap`, the
  bootstrap it replaces, gave p = 0.0002 from 4 documents).
- `compare`: McNemar or the paired bootstrap by the values' kind, with both means and the difference.
- `paired_ci`, `pooled_test`: a percentile bootstrap confidence interval for the mean paired difference (examples
  resampled jointly for both sides, seeded), and `compare` with that interval: the pooled test over every example two
  rows share.

Resampling runs in chunks of at most `MAX_DRAWS` indices, so memory stays bounded for any corpus size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

MAX_DRAWS = 2_000_000  # indices drawn per chunk of resamples (16 MB of int64)
SE_ITERS = 1_000  # resamples for a bootstrap standard error
TEST_ITERS = 10_000  # resamples for a paired bootstrap p-value
MAX_ITERS = 1_000_000  # resamples: more buys no precision a table can show


def stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _resamples(n: int, iters: int, seed: int) -> Iterator[Any]:
    """Index arrays [k, n] (k resamples of n indices with replacement) adding up to `iters` rows, `MAX_DRAWS` at most
    per chunk, from one seeded generator."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    rows = max(1, MAX_DRAWS // max(n, 1))
    done = 0
    while done < iters:
        k = min(rows, iters - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _sign_flip_p(observed: float, resampled: Any, iters: int) -> float:
    """Two-sided p that a statistic observed at `observed` (≠ 0) has the other sign: (1 + #other side) / (iters + 1),
    doubled. A resample that cannot be computed (NaN) counts as the other side."""
    import numpy as np

    other = ~(resampled > 0) if observed > 0 else ~(resampled < 0)
    return min(1.0, 2 * (1 + int(np.count_nonzero(other))) / (iters + 1))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iters: int = TEST_ITERS, seed: int = 0) -> float:
    """Two-sided p that mean(a - b) has the other sign, over `iters` resamples of the examples."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    d = np.asarray([x - y for x, y in zip(a, b)], dtype=np.float64)
    observed = float(d.mean()) if len(d) else 0.0
    if len(d) == 0 or observed == 0 or not math.isfinite(observed):
        return 1.0
    means = np.concatenate([d[idx].mean(1) for idx in _resamples(len(d), iters, seed)])
    return _sign_flip_p(observed, means, iters)


def _corpus(ll_sum: Any, w_sum: Any, how: str) -> Any:
    """The aggregate of summed log-likelihoods and weights (numpy arrays or floats): exp(-ll/w) or -ll/w/ln 2."""
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mean = np.where(w_sum > 0, ll_sum / np.where(w_sum > 0, w_sum, 1.0), np.nan)
        if how == "perplexity":
            return np.exp(-mean)
        if how == "bits_per_byte":
            return -mean / math.log(2)
    raise ValueError(f"unknown corpus aggregate {how!r}: perplexity or bits_per_byte")


def corpus_aggregate(ll: Sequence[float], weights: Sequence[float], how: str) -> float:
    """lm-eval's corpus score from per-document log-likelihoods and weights: `how` = "perplexity" (exp(-Σll/Σw),
    `weighted_perplexity`; weights of 1 give `perplexity`) or "bits_per_byte" (-Σll/Σw/ln 2). NaN when Σw = 0."""
    if len(ll) != len(weights):
        raise ValueError(f"log-likelihoods and weights differ in length: {len(ll)} vs {len(weights)}")
    return float(_corpus(math.fsum(ll), math.fsum(weights), how))


def corpus_stderr(ll: Sequence[float], weights: Sequence[float], how: str, iters: int = SE_ITERS,
                  seed: int = 0) -> float:
    """Standard error of `corpus_aggregate` by bootstrap over documents: the sample standard deviation of the
    aggregate over `iters` corpora of as many documents drawn with replacement. NaN under 2 documents."""
    import numpy as np

    if len(ll) != len(weights):
        raise ValueError(f"log-likelihoods and weights differ in length: {len(ll)} vs {len(weights)}")
    if len(ll) < 2:
        return float("nan")
    x, w = np.asarray(ll, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    agg = np.concatenate([_corpus(x[i].sum(1), w[i].sum(1), how) for i in _resamples(len(x), iters, seed)])
    agg = agg[np.isfinite(agg)]
    return float(agg.std(ddof=1)) if len(agg) > 1 else float("nan")


EXACT_MAX_DOCS = 16  # up to 2^16 sign patterns: enumerated exactly; beyond, TEST_ITERS seeded random ones


def _sign_patterns(n: int, iters: int, seed: int) -> Iterator[Any]:
    """Boolean arrays [k, n] (True: swap the two models on that document): every one of the 2^n patterns when
    n <= EXACT_MAX_DOCS, else `iters` random ones from one seeded generator; `MAX_DRAWS` entries at most per chunk."""
    import numpy as np

    rows = max(1, MAX_DRAWS // max(n, 1))
    if n <= EXACT_MAX_DOCS:
        codes = np.arange(2 ** n, dtype=np.int64)
        bits = np.arange(n, dtype=np.int64)
        for lo in range(0, len(codes), rows):
            yield ((codes[lo:lo + rows, None] >> bits[None, :]) & 1).astype(bool)
        return
    rng = np.random.Generator(np.random.PCG64(seed))
    done = 0
    while done < iters:
        k = min(rows, iters - done)
        yield rng.integers(0, 2, size=(k, n)).astype(bool)
        done += k


def paired_corpus_test(ll_a: Sequence[float], w_a: Sequence[float], ll_b: Sequence[float], w_b: Sequence[float],
                       how: str, iters: int = TEST_ITERS, seed: int = 0) -> dict[str, Any]:
    """Two models' per-document (log-likelihood, weight) on the same documents, in the same order: the aggregate of
    each (`corpus_aggregate`), `diff` = a - b, and the two-sided `p_value` of a paired permutation (sign-flip) test
    over documents: under "no difference" each document's two results are exchangeable, so the aggregate difference
    is recomputed with A and B swapped on every subset of documents, and p is the share of those differences at
    least as large in size as the observed one. Exact (all 2^n swaps) for n <= EXACT_MAX_DOCS documents: p can never
    go below 2 / 2^n (4 documents: 0.125), as it should from so few; beyond, `iters` seeded random swaps,
    p = (1 + #at least as large) / (iters + 1). `exact` says which."""
    import numpy as np

    n = len(ll_a)
    if not (len(w_a) == len(ll_b) == len(w_b) == n):
        raise ValueError(f"paired corpora differ in length: {n}, {len(w_a)}, {len(ll_b)}, {len(w_b)}")
    if not (isinstance(iters, int) and 100 <= iters <= MAX_ITERS):
        raise ValueError(f"iters must be an integer in [100, {MAX_ITERS}], got {iters!r}")
    agg_a, agg_b = corpus_aggregate(ll_a, w_a, how), corpus_aggregate(ll_b, w_b, how)
    exact = n <= EXACT_MAX_DOCS
    out = {"n": n, "mean_a": agg_a, "mean_b": agg_b, "diff": agg_a - agg_b, "test": "sign_flip_corpus",
           "exact": exact}
    if n == 0 or not math.isfinite(out["diff"]) or out["diff"] == 0:
        return out | {"p_value": 1.0}
    xa, wa = np.asarray(ll_a, dtype=np.float64), np.asarray(w_a, dtype=np.float64)
    xb, wb = np.asarray(ll_b, dtype=np.float64), np.asarray(w_b, dtype=np.float64)
    dx, dw = xb - xa, wb - wa  # swapping document i moves (x_b - x_a)_i from B's sums to A's
    sa_x, sa_w, sb_x, sb_w = xa.sum(), wa.sum(), xb.sum(), wb.sum()
    observed = abs(out["diff"]) * (1 - 1e-9)  # a permuted difference equal to the observed one, up to rounding, counts
    hits = total = 0
    for s in _sign_patterns(n, iters, seed):
        moved_x, moved_w = s @ dx, s @ dw
        d = _corpus(sa_x + moved_x, sa_w + moved_w, how) - _corpus(sb_x - moved_x, sb_w - moved_w, how)
        hits += int(np.count_nonzero(~(np.abs(d) < observed)))  # NaN (no weight left) counts as extreme
        total += len(s)
    p = hits / total if exact else (1 + hits) / (iters + 1)
    return out | {"p_value": min(1.0, p)}


def paired_corpus_bootstrap(ll_a: Sequence[float], w_a: Sequence[float], ll_b: Sequence[float],
                            w_b: Sequence[float], how: str, iters: int = TEST_ITERS, seed: int = 0) -> dict[str, Any]:
    """Two models' per-document (log-likelihood, weight) on the same documents, in the same order: the aggregate of
    each (`corpus_aggregate`), `diff` = a - b, and the two-sided paired bootstrap `p_value` that the difference has
    the other sign, resampling documents jointly for both. Kept for reference: on a few documents its p is far too
    small (4 documents can give p = 0.0002); the leaderboard uses `paired_corpus_test`."""
    import numpy as np

    n = len(ll_a)
    if not (len(w_a) == len(ll_b) == len(w_b) == n):
        raise ValueError(f"paired corpora differ in length: {n}, {len(w_a)}, {len(ll_b)}, {len(w_b)}")
    agg_a, agg_b = corpus_aggregate(ll_a, w_a, how), corpus_aggregate(ll_b, w_b, how)
    out = {"n": n, "mean_a": agg_a, "mean_b": agg_b, "diff": agg_a - agg_b, "test": "paired_bootstrap_corpus"}
    if n == 0 or not math.isfinite(out["diff"]) or out["diff"] == 0:
        return out | {"p_value": 1.0}
    xa, wa = np.asarray(ll_a, dtype=np.float64), np.asarray(w_a, dtype=np.float64)
    xb, wb = np.asarray(ll_b, dtype=np.float64), np.asarray(w_b, dtype=np.float64)
    d = np.concatenate([_corpus(xa[i].sum(1), wa[i].sum(1), how) - _corpus(xb[i].sum(1), wb[i].sum(1), how)
                        for i in _resamples(n, iters, seed)])
    return out | {"p_value": _sign_flip_p(out["diff"], d, iters)}


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of two runs' per-example values (same examples, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    binary = all(v in (0, 1) for v in (*a, *b))
    out: dict[str, Any] = {"n": len(a), "mean_a": sum(a) / max(len(a), 1), "mean_b": sum(b) / max(len(b), 1),
                           "stderr_a": stderr(a), "stderr_b": stderr(b)}
    out["diff"] = out["mean_a"] - out["mean_b"]
    if binary:
        b_only = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
        c_only = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
        out |= {"test": "mcnemar", "a_only": b_only, "b_only": c_only, "p_value": mcnemar(b_only, c_only)}
    else:
        out |= {"test": "paired_bootstrap", "p_value": paired_bootstrap(a, b)}
    return out


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, iters: int = SE_ITERS,
              seed: int = 0) -> tuple[float, float]:
    """A `level` percentile bootstrap interval for mean(a − b) over paired examples (resampled jointly, numpy's PCG64
    seeded: the same inputs give the same interval). (NaN, NaN) without examples."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    if not (isinstance(level, float) and 0.5 <= level < 1.0):
        raise ValueError(f"level must be a fraction in [0.5, 1), got {level!r}")
    if not (isinstance(iters, int) and 100 <= iters <= MAX_ITERS):
        raise ValueError(f"iters must be an integer in [100, {MAX_ITERS}], got {iters!r}")
    d = np.asarray([x - y for x, y in zip(a, b)], dtype=np.float64)
    if len(d) == 0 or not np.isfinite(d).all():
        return float("nan"), float("nan")
    means = np.concatenate([d[idx].mean(1) for idx in _resamples(len(d), iters, seed)])
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def pooled_test(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """`compare` of two rows' per-example values pooled over every example both scored (same order), with a `level`
    bootstrap interval for the difference a − b (`ci_low`, `ci_high`)."""
    out = compare(a, b)
    lo, hi = paired_ci(a, b, level)
    return out | {"ci_low": lo, "ci_high": hi, "level": level}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order out): the i-th smallest of m is multiplied by
    m - i (i from 0), made monotone by a running maximum, capped at 1. Rejecting where the adjusted p < alpha keeps
    the chance of any false "better" in the family below alpha. NaN p-values stay NaN and do not count in m."""
    idx = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    m = len(idx)
    out = [float("nan")] * len(p_values)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


def verdict(p_value: float, diff: float, *, higher_is_better: bool = True, alpha: float = 0.05) -> str:
    """One word on a paired difference A - B: noise unless p < alpha, else which side is better."""
    if math.isnan(p_value) or math.isnan(diff):  # NaN: nothing to say
        return "unknown"
    if p_value >= alpha:
        return f"noise (p ≥ {alpha:g})"
    return "A better" if (diff > 0) == higher_is_better else "B better"


__all__ = ["compare", "corpus_aggregate", "corpus_stderr", "holm", "mcnemar", "paired_bootstrap", "paired_ci",
           "paired_corpus_bootstrap", "paired_corpus_test", "pooled_test", "stderr", "verdict"]
