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

A task with several filters (its YAML's `filter_list`, e.g. gsm8k's strict-match and flexible-extract) is logged by
lm-eval once per (document, filter) and scored per filter (results keys `metric,<filter>`): the workbench scores it by
ONE, the first of its filter_list as lm-eval reports it (`primary_filter`), samples and scores alike.

A cell (`cells/<row>/<task>.json`) records `metric`, `filter` (the lm-eval filter scored; absent in cells of sample
rows written before it was kept), `higher_is_better`, `aggregate` ("mean" | "perplexity" | "bits_per_byte" | "none";
"perplexity" covers both perplexity aggregations), `score` (lm-eval's aggregate), `doc_ids`, `values` (per-example
numbers; for perplexity-like metrics the per-document log-likelihood) and, for perplexity-like metrics only,
`weights`. Cells written before these fields existed are read with the direction and aggregate their metric's name
implies (`view`).
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
# 0/1 per example by definition; every other metric lm-eval registers (f1, likelihood ...) is not accuracy-like,
# whatever its values; only a metric of a name neither knows is judged by its values (all 0 or 1), `accuracy_like`
ACCURACY_METRICS = ("exact_match", "acc", "acc_norm", "acc_mutual_info", "acc_bytes", "em")
# lm-eval's metrics of a task whose YAML names none (lm_eval/api/registry.py DEFAULT_METRIC_REGISTRY), by output type
DEFAULT_METRICS = {"loglikelihood": ("perplexity", "acc"),
                   "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
                   "multiple_choice": ("acc", "acc_norm"), "generate_until": ("exact_match",)}
NO_FILTER = "none"  # lm-eval's filter name of a task whose YAML has no filter_list

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


def accuracy_like(metric: str, values: Sequence[float] | None = None) -> bool:
    """Whether a mean metric is 0/1 per example (shown in %, averaged with other accuracies, McNemar-tested): by its
    name first (`ACCURACY_METRICS` yes; any other metric lm-eval registers, e.g. a per-example f1, no, even when its
    values happen to be all 0 or 1); a name neither knows by its `values` (all 0 or 1; none: no)."""
    if metric in ACCURACY_METRICS:
        return True
    if metric in LM_EVAL_METRICS:
        return False
    vals = list(values or ())
    return bool(vals) and all(v in (0.0, 1.0) for v in vals)


def ranks_accuracy(spec: MetricSpec | None) -> bool:
    """An accuracy-like mean metric by its name, higher is better: the only kind averaged into one score (a sweep
    point's, a group mean)."""
    return spec is not None and spec.higher_is_better and spec.name in ACCURACY_METRICS and \
        AGGREGATE_OF.get(spec.aggregation or "mean") == "mean"


def config_metric(config: Mapping[str, Any] | None, output_type: str) -> MetricSpec | None:
    """A task's primary metric before it runs, from its lm-eval config (`tasks.lmeval.TaskRef.config`): the first
    `metric_list` entry with its direction and aggregation, else lm-eval's default for the output type."""
    entries = (config or {}).get("metric_list")
    for m in entries if isinstance(entries, list) else []:
        if isinstance(m, Mapping) and isinstance(m.get("metric"), str):
            agg, h = m.get("aggregation"), m.get("higher_is_better")
            return MetricSpec(m["metric"], h if isinstance(h, bool) else default_higher_is_better(m["metric"]),
                              agg if isinstance(agg, str) else (LM_EVAL_METRICS.get(m["metric"]) or (None, None))[1])
    for metric in DEFAULT_METRICS.get(output_type, ())[:1]:
        return MetricSpec(metric, *LM_EVAL_METRICS[metric])
    return None


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


def filter_names(filter_list: Any) -> list[str]:
    """The names of a task config's `filter_list`, in order (lm-eval's: a list of {name, filter}; a bare name
    counts)."""
    if isinstance(filter_list, str):
        return [filter_list]
    names = [f.get("name") if isinstance(f, Mapping) else f for f in filter_list] \
        if isinstance(filter_list, list) else []
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))


def _key_filters(entry: Any) -> list[str]:
    """The filters a results entry's `metric,filter` keys name, in lm-eval's order."""
    keys = entry if isinstance(entry, Mapping) else {}
    return list(dict.fromkeys(k.split(",", 1)[1] for k in keys if isinstance(k, str) and "," in k))


def task_filters(results: Any) -> dict[str, list[str]]:
    """lm-eval's results JSON -> {task (without the suite's affixes): its filters, primary first}: the task's
    `filter_list` as lm-eval records it in `configs`, then the filters its results keys (`metric,filter`) name, in
    lm-eval's order. lm-eval logs one sample and one score per (document, filter); a task is scored by ONE of them,
    the first (`primary_filter`). A results JSON of any other shape gives {}."""
    if not isinstance(results, Mapping):
        return {}
    configs = results.get("configs") if isinstance(results.get("configs"), Mapping) else {}
    res = results.get("results") if isinstance(results.get("results"), Mapping) else {}
    out: dict[str, list[str]] = {}
    for name in dict.fromkeys([*configs, *res]):
        if not isinstance(name, str):
            continue
        cfg = configs.get(name) if isinstance(configs.get(name), Mapping) else {}
        names = list(dict.fromkeys([*filter_names(cfg.get("filter_list")), *_key_filters(res.get(name))]))
        if names:
            out.setdefault(_suite_task(name), names)
    return out


def primary_filter(task: str, results: Any = None, sample_filters: Sequence[Any] | None = None) -> str | None:
    """The one filter a task is scored by: the first of its filter_list as lm-eval reports it (`task_filters`: the
    results JSON's `configs`, else the order of its `metric,filter` keys) that its samples carry, when
    `sample_filters` names theirs; else the first filter of its samples; None when nothing names one (sample rows
    written before the filter was kept: the task had one)."""
    seen = [f for f in dict.fromkeys(sample_filters or ()) if isinstance(f, str)]
    names = task_filters(results).get(task, [])
    if seen:
        names = [f for f in names if f in seen] or seen
    return names[0] if names else None


def filter_rows(rows: Sequence[Mapping[str, Any]], flt: str | None) -> list[Mapping[str, Any]]:
    """The sample rows of filter `flt` (None: the first filter the rows carry); a row without a `filter` (written
    before it was kept, when a task had one) belongs to any."""
    if flt is None:
        flt = next((r["filter"] for r in rows if isinstance(r.get("filter"), str)), None)
    return [r for r in rows if flt is None or r.get("filter", flt) == flt]


def filter_scores(entry: Any, flt: str | None) -> dict[str, Any]:
    """A task's lm-eval results entry ({`metric,filter`: value, `metric_stderr,filter`: ...}) -> {metric: value} of
    filter `flt` (None: the first filter its keys name); never a mix of filters."""
    if not isinstance(entry, Mapping):
        return {}
    flt = flt if flt is not None else next(iter(_key_filters(entry)), None)
    out = {}
    for k, v in entry.items():
        if isinstance(k, str) and "," in k and "_stderr" not in k.split(",", 1)[0]:
            metric, f = k.split(",", 1)
            if f == flt:
                out.setdefault(metric, v)
    return out


def task_scores(results: Any, task: str, flt: str | None = None) -> dict[str, Any] | None:
    """{metric: value} of `task` (the suite's plain name or lm-eval's) in lm-eval's results JSON, of filter `flt`
    (None: the task's `primary_filter`); None when the results do not score the task."""
    res = results.get("results") if isinstance(results, Mapping) else None
    if not isinstance(res, Mapping):
        return None
    for name, entry in res.items():
        if isinstance(name, str) and _suite_task(name) == task and isinstance(entry, Mapping):
            return filter_scores(entry, flt if flt is not None else primary_filter(task, results))
    return None


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


def cell_fields(samples: Sequence[Mapping[str, Any]], spec: MetricSpec, score: Any = None,
                filter: str | None = None) -> dict[str, Any]:
    """A task's sample rows (`record.compact_sample`: doc_id, filter, metrics {name: value}), sorted by doc_id, and its
    primary metric -> the cell fields: metric, filter (the one lm-eval filter scored: `filter`, else the first the rows
    carry; absent for rows without one), higher_is_better, aggregate, score (lm-eval's aggregate of that filter, None
    when not a number), n (examples scored), doc_ids, values and, perplexity-like only, weights; `note` says why a
    cell has no per-example values though it has samples. Rows of other filters are left out: one value per
    document."""
    samples = filter_rows(samples, filter)
    flt = filter if filter is not None else next(
        (s["filter"] for s in samples if isinstance(s.get("filter"), str)), None)
    raw = [(s.get("metrics") or {}).get(spec.name) for s in samples]
    agg, note = aggregate_of(spec, raw)
    out: dict[str, Any] = {"metric": spec.name, **({"filter": flt} if flt is not None else {}),
                           "higher_is_better": spec.higher_is_better, "aggregate": agg,
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
    flt = fields.get("filter")
    name = f"{v.metric} ({flt})" if isinstance(flt, str) and flt != NO_FILTER else v.metric
    if v.aggregate == "mean" and accuracy_like(v.metric, v.values):
        return f"{100 * value:.1f}% {name} {arrow}"
    return f"{name} {value:.4g} {arrow}"


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
        """Accuracy-like (`accuracy_like`: by the metric's name, an unknown name by its values)."""
        return self.aggregate == "mean" and accuracy_like(self.metric, self.values)


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
    "DEFAULT_METRICS",
    "LM_EVAL_METRICS",
    "NO_FILTER",
    "CellView",
    "MetricSpec",
    "accuracy_like",
    "aggregate_of",
    "cell_fields",
    "config_metric",
    "default_aggregate",
    "default_higher_is_better",
    "describe",
    "filter_names",
    "filter_rows",
    "filter_scores",
    "primary_filter",
    "primary_metric",
    "ranks_accuracy",
    "task_filters",
    "task_metrics",
    "task_scores",
    "view",
]
