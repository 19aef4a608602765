"""Standard errors and paired tests against hand-computed cases."""

import math

import pytest

from workbench.eval.stats import compare, mcnemar, paired_bootstrap, stderr


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
    assert paired_bootstrap(a, [x - 0.5 for x in a]) == 0.0  # always better by 0.5: never flips
    assert paired_bootstrap(a, a) == 1.0
    noisy = [(-1) ** i * 0.3 for i in range(40)]  # mean difference 0, symmetric
    assert paired_bootstrap([0.0] * 40, noisy) > 0.5
    assert compare([0.5, 0.7], [0.4, 0.9])["test"] == "paired_bootstrap"
