"""The server's counters and histograms in Prometheus' text format (GET /metrics), with no dependency.

Per model: requests by outcome (stop, length, error, cancelled), prompt and generated tokens, time in the
scheduler's queue before the prefill, time to first token (from the request's arrival, tokenising included),
inter-token latency; per server: HTTP responses by route and status,
the number of rows of each decode step (batch size), and the adapter cache: loads into kernel slots, evictions
(least recently used, under --max-loaded-adapters), resident and registered adapters, run-time loads and unloads.
Model labels are the requested names (an adapter, a
composition, `mix:...`); past `MAX_MODELS` distinct names new ones are counted as "other". Integral values
(counters, counts, sums of integers) are written exactly, others with Python's shortest round-tripping repr;
histogram buckets are cumulative (`le` is an upper bound, inclusive) and `+Inf` equals `_count`.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict

MAX_MODELS = 256
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_HELP = {
    "workbench_requests_total": ("counter", "sequences finished, by model and outcome (stop, length, error, cancelled)"),
    "workbench_prompt_tokens_total": ("counter", "prompt tokens of admitted sequences, by model"),
    "workbench_generation_tokens_total": ("counter", "tokens generated, by model"),
    "workbench_http_responses_total": ("counter", "HTTP responses, by route and status"),
    "workbench_queue_seconds": ("histogram", ("time from the scheduler's queue (after tokenising) to the start of "
                                              "the prefill, by model")),
    "workbench_time_to_first_token_seconds": ("histogram", ("time from the request's arrival (before tokenising) to "
                                                            "the first generated token, by model")),
    "workbench_inter_token_seconds": ("histogram", "time between two generated tokens of a sequence, by model"),
    "workbench_batch_size": ("histogram", "rows decoded together in one decode step"),
    "workbench_running_sequences": ("gauge", "sequences decoding now"),
    "workbench_queued_sequences": ("gauge", "sequences waiting for a row"),
    "workbench_adapter_loads_total": ("counter", ("servable adapters written into a kernel slot: those resident from "
                                                  "the start, run-time loads with room, on-demand loads under "
                                                  "--max-loaded-adapters (composition parts not counted)")),
    "workbench_adapter_evictions_total": ("counter", ("least recently used adapters taken out of their kernel slot "
                                                      "for another (--max-loaded-adapters)")),
    "workbench_resident_adapters": ("gauge", "servable adapters in a kernel slot now"),
    "workbench_registered_adapters": ("gauge", "adapters served (resident or waiting on the CPU)"),
    "workbench_adapter_host_reads_total": ("counter", ("paged adapters (a pool served under --max-loaded-adapters) "
                                                       "read from disk into host memory, ahead of their requests")),
    "workbench_adapter_staged_drops_total": ("counter", ("paged adapters dropped from host memory (least recently "
                                                         "used beyond --max-host-adapters); read again when needed")),
    "workbench_staged_adapters": ("gauge", "paged adapters in host memory and not in a kernel slot now"),
    "workbench_runtime_adapter_loads_total": ("counter", ("adapters and compositions loaded through POST "
                                                          "/v1/load_lora_adapter")),
    "workbench_runtime_adapter_unloads_total": ("counter", ("adapters and compositions unloaded through POST "
                                                            "/v1/unload_lora_adapter")),
}


def number(v: float) -> str:
    """A sample value in Prometheus' text format: integral values exactly (1234567, not 1.23457e+06), other floats
    with the shortest repr that reads back as the same float, +Inf, -Inf, NaN."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**63:
        return str(int(v))
    return repr(v)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Thread-safe counters and histograms; `render()` is the /metrics body."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(int)
        self._hists: dict[tuple[str, tuple[tuple[str, str], ...]], list] = {}
        self._models: set[str] = set()
        self.gauges: dict[str, callable] = {}  # name -> function returning its value now (gauges, engine counters)

    def _model(self, name: str) -> str:
        if name not in self._models:
            if len(self._models) >= MAX_MODELS:
                return "other"
            self._models.add(name)
        return name

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        with self._lock:
            if "model" in labels:
                labels["model"] = self._model(labels["model"])
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, value: float, buckets=SECONDS, **labels: str) -> None:
        with self._lock:
            if "model" in labels:
                labels["model"] = self._model(labels["model"])
            key = (name, tuple(sorted(labels.items())))
            h = self._hists.setdefault(key, [buckets, [0] * len(buckets), 0, 0])
            i = bisect.bisect_left(h[0], value)  # the first bucket whose bound is >= value (le: inclusive)
            if i < len(buckets):
                h[1][i] += 1
            h[2] += value
            h[3] += 1

    def count(self, name: str, **labels: str) -> float:
        """A counter's value (0 when never incremented): for tests and /health."""
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    # -- the scheduler's hooks (one Job each)
    def admitted(self, job, queue_s: float) -> None:
        self.observe("workbench_queue_seconds", queue_s, model=job.model)
        self.inc("workbench_prompt_tokens_total", len(job.prompt_ids), model=job.model)

    def first_token(self, job, seconds: float) -> None:
        self.observe("workbench_time_to_first_token_seconds", seconds, model=job.model)

    def inter_token(self, job, seconds: float) -> None:
        self.observe("workbench_inter_token_seconds", seconds, model=job.model)

    def token(self, job) -> None:
        self.inc("workbench_generation_tokens_total", model=job.model)

    def batch(self, rows: int) -> None:
        self.observe("workbench_batch_size", rows, buckets=ROWS)

    def finished(self, job, outcome: str) -> None:
        self.inc("workbench_requests_total", model=job.model, outcome=outcome)

    def render(self) -> str:
        with self._lock:
            counters, hists = dict(self._counters), {k: (v[0], list(v[1]), v[2], v[3]) for k, v in self._hists.items()}
        gauges = {name: fn() for name, fn in self.gauges.items()}
        lines: list[str] = []
        for name, (kind, text) in _HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if name in gauges:  # a value read when rendered (gauges, and counters kept by the engine)
                lines.append(f"{name} {number(gauges[name])}")
            for (n, labels), v in sorted(counters.items()):
                if n == name:
                    lines.append(f"{name}{_labels(labels)} {number(v)}")
            for (n, labels), (buckets, counts, total, count) in sorted(hists.items()):
                if n != name:
                    continue
                cum = 0
                for b, c in zip(buckets, counts):
                    cum += c
                    lines.append(f"{name}_bucket{_labels(labels + (('le', number(b)),))} {cum}")
                lines += [f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {count}",
                          f"{name}_sum{_labels(labels)} {number(total)}", f"{name}_count{_labels(labels)} {count}"]
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels) + "}" if labels else ""


__all__ = ["Metrics", "number"]
