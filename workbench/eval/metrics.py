"""A task's primary metric, its direction and how lm-eval aggregates it; a run's sample rows turned into a cell.

lm-eval reports per task the metrics of its `metric_list` (results JSON `configs[task].metric_list`, in the task's
order), `higher_is_better: {task: {metric: bool}}`, and per sample each metric's per-sample value, whose shape
follows the metric's aggregation (lm_eval/api/metrics.py):

- `mean` (exact_match, acc, acc_norm, a per-example f1 ...): one number per example; the score is their mean.
- `weighted_perplexity` (word_perplexity, byte_perplexity) and `bits_per_byte`, of `loglikelihood_rolling`
  tasks: a `[loglikelihood, weight]` pair per document (weight: its words, resp. bytes); the score is the corpus
  aggregate exp(-Σll/Σw), resp. -Σll/Σw/ln 2, never a mean of per-document perplexities.
- `perplexity` (the `perplexity` metric of `loglikelihood` tasks): a log-likelihood per example, exp(-mean ll):
  the weighted case with weights of 1.
- anything else (corpus bleu, chrf, ter, corpus f1, mcc, brier_score ...): what the corpus-level function needs,
  e.g. (reference, prediction) strings: there are no per-example numbers, only lm-eval's score.

A cell (`cells/<row>/<task>.json`) records `metric`, `higher_is_better`, `aggregate` ("mean" | "perplexity" |
"bits_per_byte" | "none"; "perplexity" covers both perplexity aggregations), `score` (lm-eval's aggregate),
`doc_ids`, `values` (per-example numbers; for perplexity-like metrics the per-document log-likelihood) and, for
perplexity-like metrics only, `weights`. Cells written before these fields existed are read with the direction and
aggregate their metric's name implies (`view`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import stats

AGGREGATES = ("mean", "perplexity", "bits_per_byte", "none")
CORPUS = ("perplexity", "bits_per_byte")  # aggregates over the corpus: per-document (loglikelihood, weight)

# lm-eval's registered metrics (lm_eval/api/metrics.py `register_metric`): name -> (higher_is_better, aggregation).
# A task's YAML may override both; this is the default when it does not (tests/test_metrics.py checks the table
# against lm-eval's registry).
LM_EVAL_METRICS: dict[str, tuple[bool, str]] = {
    "exact_match": (True, "mean"), "acc": (True, "mean"), "acc_norm": (True, "mean"),
    "acc_mutual_info": (True, "mean"), "acc_bytes": (True, "mean"), "acc_all": (True, "mean"),
    "likelihood": (True, "mean"), "perplexity": (False, "perplexity"),
    "word_perplexity": (False, "weighted_perplexity"), "byte_perplexity": (False, "weighted_perplexity"),
    "bits_per_byte": (False, "bits_per_byte"), "brier_score": (False, "brier_score"),
    "mcc": (True, "matthews_corrcoef"), "f1": (True, "f1"), "bleu": (True, "bleu"), "chrf": (True, "chrf"),
    "chrf++": (True, "chrf++"), "ter": (False, "ter"), "bypass": (True, "bypass"),
}
# lm-eval aggregation -> the cell's aggregate; any other aggregation is corpus-level without per-example numbers
AGGREGATE_OF = {"mean": "mean", "nanmean": "mean", "perplexity": "perplexity",
                "weighted_perplexity": "perplexity", "bits_per_byte": "bits_per_byte"}
# 0/1 per example by definition (a mean metric of another name is accuracy-like when its values are all 0 or 1)
ACCURACY_METRICS = ("exact_match", "acc", "acc_norm", "acc_mutual_info", "acc_bytes", "em")

_RESULT_KEYS = ("alias", "name", "sample_len", "samples")  # lm-eval's per-task results entries that are no metric


@dataclass(frozen=True)
class MetricSpec:
    """A task's metric as lm-eval reports it: name, direction and lm-eval's aggregation (None: not known)."""

    name: str
    higher_is_better: bool
    aggregation: str | None = None


def default_higher_is_better(metric: str) -> bool:
    """The direction a metric's name implies: lm-eval's registry, else perplexities and bits per byte lower."""
    if metric in LM_EVAL_METRICS:
        return LM_EVAL_METRICS[metric][0]
    return not ("perplexity" in metric or "bits_per_byte" in metric)


def default_aggregate(metric: str) -> str:
    """The cell aggregate a metric's name implies (cells written before `aggregate` was recorded): lm-eval's registry,
    perplexity-like names, else a mean."""
    if metric in LM_EVAL_METRICS:
        return AGGREGATE_OF.get(LM_EVAL_METRICS[metric][1], "none")
    if "bits_per_byte" in metric:
        return "bits_per_byte"
    return "perplexity" if "perplexity" in metric else "mean"


def _suite_task(name: str) -> str:
    from .record import suite_task

    return suite_task(name)


def task_metrics(results: Any) -> dict[str, list[MetricSpec]]:
    """lm-eval's results JSON -> {task (without the suite's wb_ / _val affixes): its metrics, primary first}.

    The order is the task's `metric_list` as lm-eval records it in `configs`, then metrics only `higher_is_better`
    or `results` name. Direction: `higher_is_better[task][metric]`, else the metric_list entry's, else
    `default_higher_is_better`. A results JSON of any other shape gives {} (never raises)."""
    if not isinstance(results, Mapping):
        return {}

    def table(key: str) -> Mapping:
        v = results.get(key)
        return v if isinstance(v, Mapping) else {}

    configs, hib_all, res = table("configs"), table("higher_is_better"), table("results")
    out: dict[str, list[MetricSpec]] = {}
    for name in dict.fromkeys([*configs, *hib_all, *res]):
        if not isinstance(name, str):
            continue
        cfg = configs.get(name) if isinstance(configs.get(name), Mapping) else {}
        hib = hib_all.get(name) if isinstance(hib_all.get(name), Mapping) else {}
        declared: dict[str, tuple[str | None, bool | None]] = {}
        entries = cfg.get("metric_list") if isinstance(cfg.get("metric_list"), list) else []
        for m in entries:
            if isinstance(m, Mapping) and isinstance(m.get("metric"), str) and m["metric"] not in declared:
                agg, h = m.get("aggregation"), m.get("higher_is_better")
                declared[m["metric"]] = (agg if isinstance(agg, str) else None, h if isinstance(h, bool) else None)
        reported = res.get(name) if isinstance(res.get(name), Mapping) else {}
        names = list(declared) + [k for k in hib if isinstance(k, str)] + [
            k.split(",")[0] for k in reported
            if isinstance(k, str) and "_stderr" not in k and k.split(",")[0] not in _RESULT_KEYS]
        specs = []
        for metric in dict.fromkeys(names):
            agg, h = declared.get(metric, (None, None))
            higher = hib.get(metric) if isinstance(hib.get(metric), bool) else h if h is not None \
                else default_higher_is_better(metric)
            specs.append(MetricSpec(metric, higher, agg or (LM_EVAL_METRICS.get(metric) or (None, None))[1]))
        if specs:
            out.setdefault(_suite_task(name), specs)
    return out


def primary_metric(task: str, results: Any = None, sample_metrics: Sequence[str] | None = None,
                   scores: Mapping[str, Any] | None = None) -> MetricSpec | None:
    """The metric a task is ranked by: the first of its metric_list in lm-eval's `results` JSON (that its samples
    carry, when `sample_metrics` names them), else the first metric of its samples, else of its `scores` (the run
    manifest's {metric: value}); None when nothing names one."""
    specs = task_metrics(results).get(task, [])
    if sample_metrics:
        specs = [s for s in specs if s.name in sample_metrics] or specs
    if specs:
        return specs[0]
    for names in (sample_metrics, list(scores or {})):
        for metric in names or []:
            if isinstance(metric, str):
                return MetricSpec(metric, default_higher_is_better(metric), (LM_EVAL_METRICS.get(metric) or (None, None))[1])
    return None


# ----------------------------------------------------------------------------- sample rows -> cell fields


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scalar(v: Any) -> float | None:
    """A per-example number (a bool counts as 0/1), or None."""
    if isinstance(v, bool):
        return float(v)
    return float(v) if _num(v) else None


def _pair(v: Any) -> tuple[float, float] | None:
    """A `[loglikelihood, weight]` pair (weight ≥ 0), or None."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and _num(v[0]) and _num(v[1]) and v[1] >= 0:
        return float(v[0]), float(v[1])
    return None


def aggregate_of(spec: MetricSpec, raw: Sequence[Any]) -> tuple[str, str | None]:
    """(the cell aggregate, why there are no per-example numbers or None) for a metric's per-sample values."""
    agg = AGGREGATE_OF.get(spec.aggregation, "none") if spec.aggregation else None
    if agg is None:  # an aggregation lm-eval did not name: the values say
        agg = "mean" if all(_scalar(v) is not None for v in raw) else "none"
    if agg == "none":
        return "none", (f"{spec.name} is aggregated over the corpus by lm-eval"
                        + (f" ({spec.aggregation})" if spec.aggregation else "")
                        + ": its per-sample values are not per-example scores")
    if not raw:
        return agg, None
    if agg == "mean" or spec.aggregation == "perplexity":  # plain perplexity: one log-likelihood per example
        ok = all(_scalar(v) is not None for v in raw)
    else:
        ok = all(_pair(v) is not None for v in raw)
    if not ok:
        return agg, f"{spec.name}: per-sample values are not finite numbers of the expected shape"
    return agg, None


def cell_fields(samples: Sequence[Mapping[str, Any]], spec: MetricSpec, score: Any = None) -> dict[str, Any]:
    """A task's sample rows (`record.compact_sample`: doc_id, metrics {name: value}), sorted by doc_id, and its
    primary metric -> the cell fields: metric, higher_is_better, aggregate, score (lm-eval's aggregate, None when not
    a number), n (examples scored), doc_ids, values and, perplexity-like only, weights; `note` says why a cell has
    no per-example values though it has samples."""
    raw = [(s.get("metrics") or {}).get(spec.name) for s in samples]
    agg, note = aggregate_of(spec, raw)
    out: dict[str, Any] = {"metric": spec.name, "higher_is_better": spec.higher_is_better, "aggregate": agg,
                           "score": float(score) if _num(score) else None, "n": len(samples)}
    doc_ids = [s.get("doc_id") for s in samples]
    if note or agg == "none":
        out |= {"doc_ids": [], "values": []}
    elif agg == "mean" or spec.aggregation == "perplexity":
        out |= {"doc_ids": doc_ids, "values": [_scalar(v) for v in raw]}
        if agg in CORPUS:
            out["weights"] = [1.0] * len(raw)
    else:
        pairs = [_pair(v) for v in raw]
        out |= {"doc_ids": doc_ids, "values": [p[0] for p in pairs], "weights": [p[1] for p in pairs]}
    if agg in CORPUS and "weights" not in out:
        out["weights"] = []
    if note:
        out["note"] = note
    return out


def describe(fields: Mapping[str, Any]) -> str:
    """One line on a cell: '87.5% exact_match ↑' or 'word_perplexity 237.8 ↓' (the log line of a finished cell)."""
    v = view(fields)
    value = v.value
    arrow = "↑" if v.higher_is_better else "↓"
    if math.isnan(value):
        return f"{v.metric} – {arrow}"
    if v.aggregate == "mean" and v.values and all(x in (0.0, 1.0) for x in v.values):
        return f"{100 * value:.1f}% {v.metric} {arrow}"
    return f"{v.metric} {value:.4g} {arrow}"


# ----------------------------------------------------------------------------- reading a cell


@dataclass(frozen=True)
class CellView:
    """A cell record as readers use it, old cells included: direction and aggregate from the metric's name when the
    record predates them; `weights` None when a perplexity-like cell has none (no se, no paired test)."""

    metric: str
    higher_is_better: bool
    aggregate: str
    doc_ids: tuple
    values: tuple
    weights: tuple | None
    score: float | None
    n: int
    note: str | None = None

    @property
    def per_example(self) -> bool:
        """Per-example numbers that give a standard error and a paired test."""
        if not self.values or self.aggregate == "none":
            return False
        return self.aggregate == "mean" or (self.weights is not None and len(self.weights) == len(self.values))

    @property
    def value(self) -> float:
        """The task's score: the mean, or the corpus aggregate of the examples recorded, else lm-eval's score."""
        if self.per_example:
            if self.aggregate == "mean":
                return sum(self.values) / len(self.values)
            return stats.corpus_aggregate(self.values, self.weights, self.aggregate)
        return self.score if self.score is not None else float("nan")

    @property
    def stderr(self) -> float:
        """The standard error of `value`: of a mean (`stats.stderr`, as lm-eval), or bootstrapped over documents for a
        corpus aggregate (`stats.corpus_stderr`); NaN without per-example numbers."""
        if not self.per_example:
            return float("nan")
        if self.aggregate == "mean":
            return stats.stderr(self.values)
        return stats.corpus_stderr(self.values, self.weights, self.aggregate)

    @property
    def binary(self) -> bool:
        return self.aggregate == "mean" and bool(self.values) and all(v in (0.0, 1.0) for v in self.values)


def view(cell: Mapping[str, Any]) -> CellView:
    """A cell record (or a leaderboard source's cell: metric, doc_ids, values, maybe `mean` only) as a `CellView`."""
    metric = str(cell.get("metric") or "?")
    hib = cell.get("higher_is_better")
    agg = cell.get("aggregate")
    agg = agg if agg in AGGREGATES else default_aggregate(metric)
    values = tuple(float(v) for v in cell.get("values") or ())
    weights = cell.get("weights")
    weights = tuple(float(w) for w in weights) if isinstance(weights, list) and agg in CORPUS and \
        len(weights) == len(values) else None
    score = cell.get("score") if _num(cell.get("score")) else cell.get("mean")
    note = cell.get("note") if isinstance(cell.get("note"), str) else None
    if agg in CORPUS and values and weights is None and note is None:
        note = (f"{metric}: the cell records no per-document weights (written before they were kept): the corpus "
                "score only, no standard error or paired test; rerun the cell for them")
    if not values and note is None:
        note = (f"{metric}: no per-example values recorded (a run without per-sample outputs): the score only"
                if agg != "none" else f"{metric}: lm-eval gives no per-example values for it: the score only")
    n = len(values) if values else (cell.get("n") if isinstance(cell.get("n"), int) and not isinstance(
        cell.get("n"), bool) else 0)
    return CellView(metric, hib if isinstance(hib, bool) else default_higher_is_better(metric), agg,
                    tuple(cell.get("doc_ids") or ()), values, weights, float(score) if _num(score) else None, n, note)


__all__ = [
    "ACCURACY_METRICS",
    "AGGREGATES",
    "AGGREGATE_OF",
    "CORPUS",
    "LM_EVAL_METRICS",
    "CellView",
    "MetricSpec",
    "aggregate_of",
    "cell_fields",
    "default_aggregate",
    "default_higher_is_better",
    "describe",
    "primary_metric",
    "task_metrics",
    "view",
]
