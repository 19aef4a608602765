"""Uncertainty of scores on a few hundred examples: standard errors and paired tests between two runs.

- `stderr`: the standard error of a mean over examples, as lm-eval computes it (`mean_stderr`: sample
  standard deviation, n - 1, over sqrt(n)); for exact match (0/1) that is sqrt(p (1 - p) / (n - 1)).
- `mcnemar`: two runs scored on the same examples with exact match: the exact two-sided binomial test on
  the discordant pairs (b = A right and B wrong, c = the reverse; p = min(1, 2 P[X <= min(b, c)]), X ~
  Bin(b + c, 1/2)); only the examples where the two disagree carry information.
- `paired_bootstrap`: the same question for other metrics: resample examples (a local, seeded generator),
  two-sided p of the mean difference changing sign.
- `compare`: one of the two by the values' kind, with both means and the difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


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


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iters: int = 10_000, seed: int = 0) -> float:
    """Two-sided p that mean(a - b) has the other sign, over `iters` resamples of the examples."""
    import torch

    d = torch.tensor([x - y for x, y in zip(a, b)], dtype=torch.float64)
    if len(d) == 0 or bool((d == 0).all()):
        return 1.0
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(len(d), (iters, len(d)), generator=g)].mean(1)
    observed = float(d.mean())
    flipped = float((means <= 0).double().mean()) if observed > 0 else float((means >= 0).double().mean())
    return min(1.0, 2 * flipped)


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


def verdict(p_value: float, diff: float, *, higher_is_better: bool = True, alpha: float = 0.05) -> str:
    """One word on a paired difference A - B: noise unless p < alpha, else which side is better."""
    if p_value != p_value or diff != diff:  # NaN: nothing to say
        return "unknown"
    if p_value >= alpha:
        return f"noise (p ≥ {alpha:g})"
    return "A better" if (diff > 0) == higher_is_better else "B better"


__all__ = ["compare", "mcnemar", "paired_bootstrap", "stderr", "verdict"]
