"""`workbench bench scale`: how each operation's cost grows with the number of experts N (issue 27).

For each N (8, 64, 256, 1,024 by default), over the first N adapters of one synthetic pool (`workbench.synth`:
perturbations of the source pool's LoRA experts, ranks 4/8/16, varied target modules; never experts):
- pool_add: `Pool.add_many` of the N adapter folders into a new pool (validate, copy, hash; one manifest write);
- verify: `Pool.verify()` of that pool (every file hashed: its digests are not cached yet);
- verify_again: the same, digests from the on-disk cache (what every later verify and build sees);
- ties_merge_lora: TIES (density 0.2) of the N LoRAs to a rank-16 LoRA (a real build, empty artifact cache);
- arrow_build: the Arrow router over the N (prototypes for every module, one matrix each);
- routed_forward_top2: a forward of `seqs` x `tokens` random tokens through the Arrow artifact (top-2 of N), and
  of the base model in the same process, interleaved, fastest of `reps` each: `ratio_to_base`.
Each operation runs once per N in a fresh process (the libraries imported before its clock starts): wall seconds and peak
anonymous memory sampled from /proc (absolute, and above what the process held when the operation began: the
operation's own). A least-squares line through log(cost) against log(N) gives each operation's fitted exponent
(1: linear in N), for time and for the operation's own memory. JSON under results/bench/ (scale-cpu.json; quick
runs: scale-cpu-quick.json) and one log-log chart of time against N per operation beside it (.svg).

- server_start, server_start_all_resident, zipf_serving (`workbench.bench.scale_serve`): a real server over the
  N-adapter pool with 64 adapters in kernel slots (the rest paged from disk) started until it answers, its peer
  with every adapter read at start, and a Zipf(1.0) workload served by both (throughput and p95 TTFT ratios, the
  adapters' host memory of each).
Operations live in `_CHILD_OPS` or, by "module:function", in `EXTRA_OPERATIONS` (called in the child with the same
spec as the others).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError

NS = (8, 64, 256, 1024)
QUICK_NS = (4, 8, 16)
MAX_N = 4096
OPERATIONS = ("pool_add", "verify", "verify_again", "ties_merge_lora", "arrow_build", "routed_forward_top2")
# Operations measured by other parts of the workbench: name -> "module:function(spec) -> dict" (see the module doc).
EXTRA_OPERATIONS: dict[str, str] = {
    "server_start": "workbench.bench.scale_serve:server_start",
    "server_start_all_resident": "workbench.bench.scale_serve:server_start_all_resident",
    "zipf_serving": "workbench.bench.scale_serve:zipf_serving"}
TARGETS = {"routed_forward_top2 ratio_to_base at N=256": "<= 1.3", "routed_forward_top2 ratio_to_base at N=1024": "<= 1.5",
           "pool operations and merge: wall exponent": "<= 1.1", "ties_merge_lora: own anonymous memory": "flat in N",
           "zipf_serving throughput_ratio at N=1024 (64 resident / all)": ">= 0.8",
           "zipf_serving p95_ttft_ratio at N=1024": "<= 2", "zipf_serving paged adapter memory": "< 4096 MB"}
POOL_OPERATIONS = ("pool_add", "verify", "verify_again", "ties_merge_lora", "arrow_build")
SAMPLE_S = 0.01


# ----------------------------------------------------------------------------- the child process


class _Peak:
    """Peak RssAnon / RssFile of this process, sampled by a thread every SAMPLE_S seconds."""

    def __init__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> tuple[int, int]:
        anon = file = 0
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("RssFile:"):
                file = int(line.split()[1])
        return anon, file

    def _run(self) -> None:
        while not self._stop.is_set():
            a, f = self.now()
            self.anon, self.file = max(self.anon, a), max(self.file, f)
            self._stop.wait(SAMPLE_S)

    def __enter__(self):
        self.start_anon, _ = self.now()
        self.anon, self.file = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        a, f = self.now()
        self.anon, self.file = max(self.anon, a), max(self.file, f)


def _op_pool_add(spec: dict[str, Any]) -> dict[str, Any]:
    from ..pool import AddItem, Pool

    master = Pool.open(spec["master"])
    items = [AddItem(e.path, e.name, kind="lora", tags=e.entry.tags, training=e.entry.training, notes=e.entry.notes,
                     data=e.entry.data) for e in master.experts[: spec["n"]]]
    target = Pool.create(spec["pool"], master.manifest.base.spec)
    target.add_many(items)
    return {"experts": len(Pool.open(spec["pool"]).names())}


def _op_verify(spec: dict[str, Any]) -> dict[str, Any]:
    from ..pool import Pool

    problems = Pool.open(spec["pool"]).verify()
    if problems:
        raise WorkbenchError(f"verify of the synthetic pool found {len(problems)} problems, e.g. {problems[0]}")
    return {}


def _op_ties(spec: dict[str, Any]) -> dict[str, Any]:
    from ..recipes import build, parse_recipe

    recipe = {"name": f"scale-ties-{spec['n']}", "pool": spec["pool"], "method": "ties",
              "parameters": {"density": spec["density"]}, "output": {"kind": "lora", "rank": spec["rank"]}}
    path = build(parse_recipe(recipe), log=lambda *a: None)
    return {"artifact_mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)}


def _op_arrow(spec: dict[str, Any]) -> dict[str, Any]:
    from ..recipes import build, parse_recipe

    recipe = {"name": f"scale-arrow-{spec['n']}", "pool": spec["pool"], "method": "arrow", "parameters": {"k": 2}}
    return {"artifact": str(build(parse_recipe(recipe), log=lambda *a: None))}


def _op_routed(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..artifacts import load_artifact
    from ..pool import Pool
    from .kernels import _time

    pool = Pool.open(spec["pool"])
    base = pool.base.load().eval()
    routed = load_artifact(Path(spec["artifact"])).model
    vocab = int(base.config.vocab_size)
    margin = min(100, vocab // 10)
    ids = torch.randint(margin, vocab - margin, (spec["seqs"], spec["tokens"]), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        samples = _time({"base": lambda: base(input_ids=ids), "routed": lambda: routed(input_ids=ids)}, spec["reps"])
    best = {k: min(v) for k, v in samples.items()}
    with torch.inference_mode():
        parts = _routed_parts(lambda: routed(input_ids=ids))
    return {"base_s": round(best["base"], 4), "routed_s": round(best["routed"], 4),
            "ratio_to_base": round(best["routed"] / best["base"], 3),
            "samples_s": {k: [round(t, 4) for t in v] for k, v in samples.items()}, "parts": parts}


def _routed_parts(forward: Callable[[], Any]) -> dict[str, Any]:
    """Where one routed forward's time goes (one more forward, after the timed ones, its pieces clocked): scoring
    and top-k in the routers (`route`), the pair metadata (`make_meta`), the LoRA op (`apply_lora`), and the mean
    number of distinct experts one module call dispatches to (the op runs one shrink/expand per active expert)."""
    from ..modules import routed_lora, routers

    spent = {"route_s": 0.0, "make_meta_s": 0.0, "apply_lora_s": 0.0}
    active: list[int] = []

    def clocked(fn, key, after=None):
        def run(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[key] += time.perf_counter() - t0
            if after is not None:
                after(out)
            return out
        return run

    saved = (routers.PrototypeRouter.route, routed_lora.make_meta, routed_lora.apply_lora)
    routers.PrototypeRouter.route = clocked(saved[0], "route_s")
    routed_lora.make_meta = clocked(saved[1], "make_meta_s", lambda m: active.append(len(m.active)))
    routed_lora.apply_lora = clocked(saved[2], "apply_lora_s")
    try:
        t0 = time.perf_counter()
        forward()
        total = time.perf_counter() - t0
    finally:
        routers.PrototypeRouter.route, routed_lora.make_meta, routed_lora.apply_lora = saved
    return {"forward_s": round(total, 4), **{k: round(v, 4) for k, v in spent.items()},
            "module_calls": len(active), "active_experts_per_call": round(sum(active) / max(len(active), 1), 1)}


_CHILD_OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pool_add": _op_pool_add, "verify": _op_verify, "verify_again": _op_verify, "ties_merge_lora": _op_ties,
    "arrow_build": _op_arrow, "routed_forward_top2": _op_routed}


def _preload() -> None:
    """Import what the operations use, before their clock starts: an operation's time and memory are its own work,
    not the libraries' import (torch alone: about 1 s and 140 MB)."""
    import mergekit.merge_methods
    import mergekit.sparsify  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from .. import artifacts, recipes  # noqa: F401
    from ..methods import arrow, merge_ta, routing  # noqa: F401
    from ..modules import routed_lora, routers  # noqa: F401
    from ..serving import api  # noqa: F401
    from . import kernels, scale_serve, serve  # noqa: F401


def _child(spec_path: str) -> None:
    """Run one operation (the spec's `op`) and write {wall_s, peak memory, the operation's own fields} as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    op = spec["op"]
    _preload()
    if op in _CHILD_OPS:
        fn = _CHILD_OPS[op]
    else:
        module, _, attr = EXTRA_OPERATIONS[op].partition(":")
        fn = getattr(importlib.import_module(module), attr)
    with _Peak() as peak:
        t0 = time.perf_counter()
        extra = fn(spec)
        wall = time.perf_counter() - t0
    out = {"n": spec["n"], "wall_s": round(wall, 4), "peak_rss_anon_mb": round(peak.anon / 1024, 1),
           "peak_rss_file_mb": round(peak.file / 1024, 1),
           "own_anon_mb": round((peak.anon - peak.start_anon) / 1024, 1), **extra}
    Path(spec["result"]).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- the parent


def _measure(spec: dict[str, Any], tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    name = f"{spec['op']}-{spec['n']}"
    spec = {**spec, "result": str(tmp / f"{name}.result.json")}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    code = "import sys; from workbench.bench.scale import _child; _child(sys.argv[1])"
    log_path = tmp / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-c", code, str(spec_path)], env={**os.environ, **env}, stdout=log,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log_path.read_text()[-600:].strip().splitlines()
        raise WorkbenchError(f"bench scale: {name} failed ({proc.returncode}): {tail[-1] if tail else 'no output'}")
    return json.loads(Path(spec["result"]).read_text())


def fit_exponent(ns: Sequence[int], values: Sequence[float], floor: float = 1e-3) -> float | None:
    """The slope of the least-squares line through (log N, log value): cost ~ N^slope (values below `floor`
    count as `floor`: memory that did not grow at all fits as flat). None for fewer than two points."""
    pts = [(math.log(n), math.log(max(v, floor))) for n, v in zip(ns, values) if v is not None]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sxx, 3) if sxx else None


def scale_chart(record: dict[str, Any]):
    """Time against N per operation, both axes logarithmic; each operation's fitted exponent in its legend label."""
    import altair as alt
    import pandas as pd

    rows = []
    for op, points in record["operations"].items():
        label = f"{op} (N^{record['exponents'][op]['wall_s']})"
        rows += [{"operation": label, "N": p["n"], "seconds": max(p["wall_s"], 1e-4)} for p in points]
    df = pd.DataFrame(rows)
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("N:Q", scale=alt.Scale(type="log", base=2), title="experts N"),
        y=alt.Y("seconds:Q", scale=alt.Scale(type="log"), title="wall seconds"),
        color=alt.Color("operation:N", title="operation (fitted exponent)", legend=alt.Legend(labelLimit=360)),
        tooltip=["operation", "N", alt.Tooltip("seconds:Q", format=".4f")],
    ).properties(title=record["title"], width=460, height=300)


def _check(ns: Sequence[int], reps: int, seqs: int, tokens: int, rank: int, density: float) -> list[int]:
    ns = sorted(set(ns))
    if len(ns) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_N for n in ns):
        raise WorkbenchError(f"bench scale: give at least two sizes N, each from 2 to {MAX_N:,} (got {ns!r:.80})")
    for name, v, lo, hi in (("reps", reps, 1, 20), ("seqs", seqs, 1, 64), ("tokens", tokens, 1, 1024),
                            ("rank", rank, 1, 256)):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise WorkbenchError(f"bench scale: {name} must be an integer from {lo} to {hi} (got {v!r:.40})")
    if not 0 < density <= 1:
        raise WorkbenchError(f"bench scale: density must be in (0, 1] (got {density!r:.40})")
    return ns


def run(base_spec: str | None = None, source: str | None = "demo", ns: Sequence[int] | None = None, *,
        quick: bool = False, reps: int | None = None, seqs: int | None = None, tokens: int | None = None,
        rank: int = 16, density: float = 0.2, seed: int = 0, zipf_requests: int | None = None,
        zipf_rate: float = 6.0, zipf_tokens: int | None = None, workdir: str | os.PathLike | None = None,
        out_file: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
        only: Sequence[str] | None = None, log=print) -> dict[str, Any]:
    """Measure every operation for each N (see the module doc); returns the record written to `out_file` (default
    results/bench/scale-cpu.json, quick: scale-cpu-quick.json) and draws the chart to `plot` (default: beside it,
    .svg). `source`: the pool whose LoRA experts the synthetic adapters perturb (None: random factors over
    `base_spec`); `base_spec` defaults to the source pool's base. `quick`: N = 4, 8, 16, one round, 2 x 8 tokens
    (a check that the benchmark runs, e.g. on the tiny test model; no figure of interest). `zipf_*`: the Zipf
    serving workload (requests, Poisson rate per second, output tokens each; default 192 x 16 tokens, quick 12 x 4,
    `reps` rounds of each arm, at most 2). Scratch pools,
    artifacts and logs go to a temporary folder under `workdir` (default: the system's), removed at the end.
    `only`: measure just these operations (besides pool_add, which makes the pool of N; the routed forward brings
    the Arrow build it runs on, verify_again the verify whose digests it reuses); the record says
    which, and a partial run never writes the default file unless `out_file` names it."""
    from ..eval.harness import git_state, machine_info, results_root
    from ..io import RACY_NS, atomic_write_json
    from ..pool import Pool
    from ..synth import synthesize
    from ..tracing import save_chart

    reps = reps if reps is not None else (1 if quick else 3)
    seqs = seqs if seqs is not None else (2 if quick else 8)
    tokens = tokens if tokens is not None else (8 if quick else 64)
    ns = _check(list(ns) if ns is not None else list(QUICK_NS if quick else NS), reps, seqs, tokens, rank, density)
    zipf_requests = zipf_requests if zipf_requests is not None else (12 if quick else 192)
    zipf_tokens = zipf_tokens if zipf_tokens is not None else (4 if quick else 16)
    for name, v, lo, hi in (("zipf_requests", zipf_requests, 1, 10_000), ("zipf_tokens", zipf_tokens, 1, 1024)):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise WorkbenchError(f"bench scale: {name} must be an integer from {lo} to {hi} (got {v!r:.40})")
    if isinstance(zipf_rate, bool) or not isinstance(zipf_rate, (int, float)) or not 0.01 <= zipf_rate <= 1000:
        raise WorkbenchError(f"bench scale: zipf_rate must be a number of requests/s from 0.01 to 1000 (got "
                             f"{zipf_rate!r:.40})")
    src = Pool.open(source) if source is not None else None
    base_spec = base_spec or (src.manifest.base.spec if src is not None else None)
    if base_spec is None:
        raise WorkbenchError("bench scale: give a source pool or a base (--base)")
    every = list(OPERATIONS) + [op for op in EXTRA_OPERATIONS if op not in OPERATIONS]
    if only is not None:
        unknown = [op for op in only if op not in every]
        if unknown or not only:
            what = f"unknown operation {str(unknown[0])[:60]!r}" if unknown else "no operation given"
            raise WorkbenchError(f"bench scale: {what}; choose from: {', '.join(every)}")
        if out_file is None:
            raise WorkbenchError("bench scale: a run of some operations needs --out (the default file holds every "
                                 "operation)")
    # the pool of N is made by pool_add, the routed forward runs on the Arrow build, and verify_again is verify
    # with the digests the first verify cached: each comes along with what needs it
    needs = {"routed_forward_top2": "arrow_build", "verify_again": "verify"}
    chosen = set(every if only is None else ["pool_add", *only, *(needs[op] for op in only if op in needs)])
    ops = [op for op in every if op in chosen]
    results: dict[str, list[dict[str, Any]]] = {op: [] for op in ops}
    with tempfile.TemporaryDirectory(prefix="wb-bench-scale-", dir=workdir) as t:
        tmp = Path(t)
        t0 = time.perf_counter()
        log(f"bench scale: synthesizing {max(ns)} adapters (templates: {source or 'none, random factors'}) ...")
        synthesize(str(tmp / "pools" / "master"), max(ns), source=src, base=base_spec if src is None else None,
                   seed=seed)
        synth_s = time.perf_counter() - t0
        for n in ns:
            pool = tmp / "pools" / f"n{n}"
            spec = {"n": n, "master": str(tmp / "pools" / "master"), "pool": str(pool), "rank": rank,
                    "density": density, "seqs": seqs, "tokens": tokens, "reps": reps, "base": base_spec,
                    "seed": seed, "zipf_requests": zipf_requests, "zipf_rate": float(zipf_rate),
                    "zipf_tokens": zipf_tokens, "zipf_reps": min(reps, 2)}
            for op in ops:
                env = {"WORKBENCH_CACHE_ARTIFACTS": str(tmp / f"artifacts-{op}-{n}")}
                if op == "verify":  # digests are remembered only for files older than RACY_NS: wait that long
                    time.sleep(max(0.0, RACY_NS / 1e9 + 0.2 - (time.time() - pool.stat().st_mtime)))
                if op == "routed_forward_top2":
                    spec["artifact"] = results["arrow_build"][-1]["artifact"]
                row = _measure({**spec, "op": op}, tmp, env)
                results[op].append(row)
                shown = {k: v for k, v in row.items() if k in ("wall_s", "own_anon_mb", "ratio_to_base",
                                                                "throughput_ratio", "p95_ttft_ratio")}
                log(f"  N={n} {op}: {shown}")
            shutil.rmtree(pool, ignore_errors=True)  # the next N's pool is a new copy: keep the disk bounded
            for f in tmp.glob("artifacts-*"):
                shutil.rmtree(f, ignore_errors=True)
    for row in results.get("arrow_build", []):
        row.pop("artifact", None)  # a temporary path
    exponents = {op: {"wall_s": fit_exponent(ns, [r["wall_s"] for r in rows]),
                      "own_anon_mb": fit_exponent(ns, [r["own_anon_mb"] for r in rows], floor=1.0)}
                 for op, rows in results.items()}
    ratio = {r["n"]: r["ratio_to_base"] for r in results.get("routed_forward_top2", [])}
    zipf = {r["n"]: {k: r.get(k) for k in ("throughput_ratio", "p95_ttft_ratio", "adapter_memory_mb",
                                           "distinct_adapters")} for r in results.get("zipf_serving", [])}
    starts = {r["n"]: {"paged_s": r["wall_s"], "all_resident_s": a["wall_s"]}
              for r, a in zip(results.get("server_start", []), results.get("server_start_all_resident", []))}
    not_scaling = [op for op in ops if (exponents[op]["wall_s"] or 0) > 1.1]
    device = "cpu"
    record = {"benchmark": "scale", "quick": quick, "only": ops if only is not None else None, "base": base_spec,
              "source": source, "ns": ns, "reps": reps,
              "shape": {"sequences": seqs, "tokens": tokens}, "merge": {"method": "ties", "density": density,
                                                                         "output_rank": rank},
              "synthesize_s": round(synth_s, 2), "operations": results, "exponents": exponents,
              "targets": TARGETS,
              "figures": {"routed_forward_top2 ratio_to_base": ratio,
                          "largest wall exponent": max(((op, e["wall_s"]) for op, e in exponents.items()
                                                        if e["wall_s"] is not None), key=lambda x: x[1], default=None),
                          "zipf_serving (64 resident / all resident)": zipf, "server start": starts,
                          "pool operations over 1.1": [op for op in POOL_OPERATIONS if op in not_scaling],
                          "operations over 1.1": not_scaling},
              "title": f"bench scale ({'quick, ' if quick else ''}{device}): wall time against the number of experts",
              "machine": machine_info(device), "git": git_state(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(out_file) if out_file else results_root() / "bench" / f"scale-{device}{'-quick' if quick else ''}.json"
    atomic_write_json(out, record)
    try:
        save_chart(scale_chart(record), Path(plot) if plot else out.with_suffix(".svg"))
    except Exception as e:  # noqa: BLE001 - the chart is a view of the JSON: a missing renderer loses only it
        log(f"bench scale: chart not drawn ({type(e).__name__}: {str(e)[:120]})")
    for op, e in exponents.items():
        log(f"  {op}: time ~ N^{e['wall_s']}, own memory ~ N^{e['own_anon_mb']}")
    return record


__all__ = ["EXTRA_OPERATIONS", "NS", "OPERATIONS", "POOL_OPERATIONS", "QUICK_NS", "fit_exponent", "run",
           "scale_chart"]
