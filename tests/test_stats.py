"""Standard errors and paired tests against hand-computed cases."""

import math

import pytest

from workbench.eval.stats import (
    compare,
    corpus_aggregate,
    corpus_stderr,
    mcnemar,
    paired_bootstrap,
    paired_corpus_bootstrap,
    paired_corpus_test,
    stderr,
)


def test_stderr_is_lm_evals_sample_stderr():
    vals = [1] * 50 + [0] * 50
    assert stderr(vals) == pytest.approx(math.sqrt(0.25 / 99))  # p (1 - p) / (n - 1), n = 100
    assert stderr([2.0, 4.0, 6.0]) == pytest.approx(math.sqrt(4.0 / 3))  # sample var 4, n 3
    assert math.isnan(stderr([1.0]))


def test_mcnemar_exact_by_hand():
    # 1 vs 9 discordant: 2 * P[X <= 1], X ~ Bin(10, 1/2) = 2 * (1 + 10) / 1024
    assert mcnemar(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar(9, 1) == mcnemar(1, 9)
    assert mcnemar(5, 5) == 1.0 and mcnemar(0, 0) == 1.0
    assert mcnemar(0, 6) == pytest.approx(2 / 64)


def test_compare_a_one_point_gap_on_100_is_noise():
    # A: 61/100, B: 60/100, differing on 3 examples (2 vs 1): p = 1 (not a ranking)
    a = [1] * 60 + [1, 1, 0] + [0] * 37
    b = [1] * 60 + [0, 0, 1] + [0] * 37
    r = compare(a, b)
    assert r["test"] == "mcnemar" and (r["a_only"], r["b_only"]) == (2, 1)
    assert r["diff"] == pytest.approx(0.01) and r["p_value"] == 1.0
    # a real gap: A right on 12 where B is wrong, the reverse on 1: 2 * (1 + 13) / 2^13
    a = [1] * 12 + [0] + [1] * 50
    b = [0] * 12 + [1] + [1] * 50
    assert compare(a, b)["p_value"] == pytest.approx(2 * 14 / 8192)


def test_paired_bootstrap_for_continuous_values():
    a = [1.0 + 0.01 * i for i in range(40)]
    # always better by 0.5: never flips, and p is (1 + 0) / (iters + 1), doubled: never 0 from finite resamples
    assert paired_bootstrap(a, [x - 0.5 for x in a]) == pytest.approx(2 / 10_001)
    assert paired_bootstrap(a, [x - 0.5 for x in a], iters=99) == pytest.approx(2 / 100)
    assert paired_bootstrap(a, a) == 1.0
    noisy = [(-1) ** i * 0.3 for i in range(40)]  # mean difference 0, symmetric
    assert paired_bootstrap([0.0] * 40, noisy) > 0.5
    assert compare([0.5, 0.7], [0.4, 0.9])["test"] == "paired_bootstrap"


def test_paired_bootstrap_is_seeded_and_bounded(monkeypatch):
    from workbench.eval import stats

    a = [0.1 * ((7 * i) % 11) for i in range(60)]
    b = [x - 0.05 + 0.2 * ((-1) ** i) for i, x in enumerate(a)]
    p = paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3) == p and 0 < p < 1  # the same inputs and seed: the same p
    drawn = []
    real = stats._resamples

    def spy(n, iters, seed):
        for idx in real(n, iters, seed):
            drawn.append(idx.size)
            yield idx

    monkeypatch.setattr(stats, "MAX_DRAWS", 600)
    monkeypatch.setattr(stats, "_resamples", spy)
    chunked = paired_bootstrap(a, b, iters=1000, seed=3)
    assert max(drawn) <= 600 and sum(drawn) == 1000 * 60  # never more than MAX_DRAWS indices at once
    assert 0 < chunked < 1


def test_corpus_aggregate_is_lm_evals():
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    # per-document (log-likelihood, words or bytes), as lm-eval's loglikelihood_rolling samples carry them
    pairs = [(-120.5, 40), (-33.0, 9), (-250.25, 77), (-8.0, 2)]
    ll, w = [x for x, _ in pairs], [y for _, y in pairs]
    assert corpus_aggregate(ll, w, "perplexity") == pytest.approx(weighted_perplexity(pairs))
    assert corpus_aggregate(ll, w, "perplexity") == pytest.approx(math.exp(411.75 / 128))  # exp(-Σll/Σw)
    assert corpus_aggregate(ll, w, "bits_per_byte") == pytest.approx(bits_per_byte(pairs))
    # never the mean of per-document perplexities
    assert corpus_aggregate(ll, w, "perplexity") != pytest.approx(sum(math.exp(-x / y) for x, y in pairs) / 4)
    assert math.isnan(corpus_aggregate([], [], "perplexity"))
    with pytest.raises(ValueError, match="unknown corpus aggregate 'bleu'"):
        corpus_aggregate(ll, w, "bleu")


def test_corpus_stderr_bootstraps_documents():
    import numpy as np

    ll = [-float(10 + (7 * i) % 13) * (1 + i % 3) for i in range(30)]
    w = [float(5 + i % 3 * 5) for i in range(30)]
    se = corpus_stderr(ll, w, "perplexity", iters=2000, seed=1)
    # by hand: the standard deviation of exp(-Σll*/Σw*) over the same resampled corpora
    rng = np.random.Generator(np.random.PCG64(1))
    idx = rng.integers(0, 30, size=(2000, 30))
    x, y = np.asarray(ll)[idx].sum(1), np.asarray(w)[idx].sum(1)
    assert se == pytest.approx(float(np.exp(-x / y).std(ddof=1)))
    assert 0 < se < corpus_aggregate(ll, w, "perplexity")
    assert corpus_stderr(ll, w, "perplexity", iters=2000, seed=1) == se  # seeded
    assert corpus_stderr([-3.0] * 10, [1.0] * 10, "perplexity") == pytest.approx(0.0)  # no spread, no error
    assert math.isnan(corpus_stderr([-3.0], [1.0], "perplexity"))


def test_paired_corpus_bootstrap_on_the_aggregate_difference():
    ll = [-float(20 + (5 * i) % 17) for i in range(40)]
    w = [10.0] * 40
    better = [x + 2.0 for x in ll]  # every document more likely: a lower perplexity
    r = paired_corpus_bootstrap(better, w, ll, w, "perplexity")
    assert r["diff"] == pytest.approx(corpus_aggregate(better, w, "perplexity") - corpus_aggregate(ll, w, "perplexity"))
    assert r["diff"] < 0 and r["p_value"] == pytest.approx(2 / 10_001) and r["test"] == "paired_bootstrap_corpus"
    assert paired_corpus_bootstrap(ll, w, ll, w, "perplexity")["p_value"] == 1.0
    # a difference within the documents' noise: one document much better, another much worse
    mixed = list(ll)
    mixed[0] += 30
    mixed[1] -= 29
    assert paired_corpus_bootstrap(mixed, w, ll, w, "perplexity")["p_value"] > 0.3
    with pytest.raises(ValueError, match="differ in length"):
        paired_corpus_bootstrap(ll, w, ll[:3], w[:3], "perplexity")


def test_paired_corpus_test_is_an_exact_sign_flip_on_few_documents():
    """4 documents, every one better under A: the bootstrap said p = 0.0002; an exact permutation test can say no
    less than 2 / 2^4 = 0.125 (only the observed assignment and its mirror are as extreme)."""
    ll = [-40.0, -90.0, -25.0, -60.0]
    w = [10.0, 20.0, 5.0, 15.0]
    better = [x + 4.0 for x in ll]
    assert paired_corpus_bootstrap(better, w, ll, w, "perplexity")["p_value"] < 0.001  # the old, untrustworthy p
    r = paired_corpus_test(better, w, ll, w, "perplexity")
    assert r["test"] == "sign_flip_corpus" and r["exact"] and r["n"] == 4
    assert r["diff"] == pytest.approx(corpus_aggregate(better, w, "perplexity") - corpus_aggregate(ll, w, "perplexity"))
    assert r["p_value"] == pytest.approx(2 / 16)
    # by hand: every one of the 16 swaps of A and B per document, the aggregate difference recomputed
    import itertools

    def diff(xa, xb):
        return corpus_aggregate(xa, w, "perplexity") - corpus_aggregate(xb, w, "perplexity")

    obs = abs(diff(better, ll))
    extreme = 0
    for s in itertools.product([0, 1], repeat=4):
        xa = [b if f else a for a, b, f in zip(better, ll, s)]
        xb = [a if f else b for a, b, f in zip(better, ll, s)]
        extreme += abs(diff(xa, xb)) >= obs * (1 - 1e-9)
    assert r["p_value"] == pytest.approx(extreme / 16)
    # the floor falls with more documents: 10 documents all better reach 2 / 1024
    ll10 = [-float(20 + 3 * i) for i in range(10)]
    assert paired_corpus_test([x + 2 for x in ll10], [5.0] * 10, ll10, [5.0] * 10, "perplexity")["p_value"] == \
        pytest.approx(2 / 1024)
    assert paired_corpus_test(ll, w, ll, w, "perplexity")["p_value"] == 1.0
    assert paired_corpus_test(better, w, ll, w, "bits_per_byte")["p_value"] == pytest.approx(2 / 16)
    with pytest.raises(ValueError, match="differ in length"):
        paired_corpus_test(ll, w, ll[:3], w[:3], "perplexity")
    with pytest.raises(ValueError, match="iters must be an integer"):
        paired_corpus_test(ll, w, ll, w, "perplexity", iters=10**9)


def test_paired_corpus_test_beyond_exact_is_seeded_monte_carlo():
    ll = [-float(20 + (5 * i) % 17) for i in range(40)]
    w = [10.0] * 40
    better = [x + 2.0 for x in ll]
    r = paired_corpus_test(better, w, ll, w, "perplexity")
    assert not r["exact"] and r["p_value"] == pytest.approx(1 / 10_001)  # no random swap is as extreme
    assert paired_corpus_test(better, w, ll, w, "perplexity") == r  # seeded
    mixed = list(ll)
    mixed[0] += 30
    mixed[1] -= 29
    assert paired_corpus_test(mixed, w, ll, w, "perplexity")["p_value"] > 0.3  # within the documents' noise


def test_leaderboard_perplexity_p_values_come_from_the_permutation_test():
    """The leaderboard's per-task test of a perplexity over 4 documents (issue 28: p = 0.0002 before)."""
    from workbench.eval.leaderboard import build_leaderboard

    ll = [-40.0, -90.0, -25.0, -60.0]
    words = [10.0, 20.0, 5.0, 15.0]

    def cell(shift):
        return {"metric": "word_perplexity", "higher_is_better": False, "aggregate": "perplexity", "n": 4,
                "doc_ids": [0, 1, 2, 3], "values": [x + shift for x in ll], "weights": words}

    board = build_leaderboard([{"name": "a", "method": "m"}, {"name": "b", "method": "m"}],
                              {("a", "python_code"): cell(4.0), ("b", "python_code"): cell(0.0)}, ["python_code"], "b")
    p = next(r for r in board["rows"] if r["name"] == "a")["tasks"]["python_code"]["paired"]
    assert p["test"] == "sign_flip_corpus" and p["p_value"] == pytest.approx(0.125) and p["gain"] > 0


def test_pooled_interval_is_the_percentile_bootstrap_at_its_level():
    """The pooled CI against a hand-written percentile bootstrap of mean(a − b): 1,000 resamples of the 18 examples
    with replacement from numpy's PCG64 seeded 0 (as the library draws them), cut at (1 − level) / 2 on each side.
    At 0.95 that is (5/18, 13/18) = (0.2778, 0.7222); a tail of 1 − level on each side (a 90% interval) gives
    (0.3333, 0.6667)."""
    import numpy as np

    from workbench.eval.stats import paired_ci, pooled_test

    a = [1, 1, 1, 1, 0, 1] + [1, 1, 1, 0, 1, 1] + [1, 0, 1, 1, 1, 1]
    b = [0, 0, 1, 0, 0, 1] + [0, 1, 0, 0, 1, 0] + [0, 0, 1, 1, 0, 0]
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    means = d[np.random.Generator(np.random.PCG64(0)).integers(0, len(d), size=(1000, len(d)))].mean(1)
    got = pooled_test(a, b)
    assert got["level"] == 0.95 and got["diff"] == pytest.approx(0.5)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((5 / 18, 13 / 18))
    for level in (0.8, 0.99):
        tail = 100 * (1 - level) / 2
        assert paired_ci(a, b, level) == pytest.approx(tuple(np.percentile(means, [tail, 100 - tail]))), level
