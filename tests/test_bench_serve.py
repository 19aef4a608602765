"""`workbench bench serve` in open-loop mode, on the demo pool's real model (SmolLM2-135M) and a real server process,
at tiny settings: the record's structure, and what its figures must satisfy when recomputed from the raw
per-request data (seeded Poisson arrivals, the same requests in every arm, TTFT <= end-to-end latency, one streamed
chunk per token of `usage`, the server's own token count, p95 and throughput recomputed). No timing targets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line, quiet

from workbench.bench import serve as bench
from workbench.errors import WorkbenchError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"rates": (4.0, 16.0), "requests": 3, "reps": 1, "min_tokens": 2, "max_tokens": 5, "short_tokens": 3,
            "n_mixes": 1, "max_batch": 8, "seed": 7}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, session_cache):
    """(record, raw data, record path, folder) of one open-loop run over the demo pool (an empty artifact cache: no
    routed composition is built, and the benchmark builds none)."""
    tmp = tmp_path_factory.mktemp("bench-serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.delenv("WORKBENCH_POOLS", raising=False)
        mp.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp / "artifacts"))
        out = tmp / "results" / "bench" / "serve-open.json"
        rec = bench.run(mode="open", pool_name="demo", out_file=out, log=quiet, progress=False, **SETTINGS)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec))  # what was returned is what was written
    return rec, bench.read_raw(out.with_name("serve-open.raw.json.gz")), out, tmp


def test_request_mix_takes_one_routed_composition_per_kind_and_records_the_kinds_not_built():
    listed = [{"id": "base", "kind": "base"}, {"id": "a", "kind": "lora"}, {"id": "b", "kind": "lora"},
              {"id": "c", "kind": "merged_lora"}, {"id": "ta", "kind": "merged_model"},
              {"id": "pg-2", "kind": "routed_lora", "router": "phatgoose"},
              {"id": "pg-1", "kind": "routed_lora", "router": "phatgoose"},
              {"id": "avg", "kind": "routed_lora", "router": "avg_act"},
              {"id": "tw", "kind": "routed_lora", "router": "twin"},
              {"id": "sm", "kind": "routed_lora", "router": "smora"}]
    mix = bench.request_mix(listed, n_adapters=8, n_mixes=2)
    assert mix["adapters"] == ["a", "b", "c"] and mix["mixes"] == ["mix:a=0.5,b=0.5"]  # one pair from 3 adapters
    assert mix["routed"]["used"] == {"phatgoose": "pg-1", "twin": "tw", "smora": "sm"}
    assert set(mix["routed"]["skipped"]) == {"arrow", "mole"} and len(mix["routed"]["available"]) == 5
    assert mix["mix"] == ["a", "b", "c", "mix:a=0.5,b=0.5", "pg-1", "tw", "sm"]
    assert bench.request_mix(listed, n_adapters=1, n_mixes=2)["mixes"] == []
    with pytest.raises(WorkbenchError, match="no LoRA adapter"):
        bench.request_mix(listed[:1], n_adapters=8, n_mixes=0)


def _runs(raw, arm=None, rate=None):
    return [r for r in raw["runs"] if (arm is None or r["arm"] == arm) and (rate is None or r["rate"] == rate)]


def test_record_lists_the_mix_arms_and_files_without_machine_paths(bench_run):
    rec, raw, out, tmp = bench_run
    assert rec["benchmark"] == "serve-open" and rec["mode"] == "open" and rec["pool"] == "demo"
    assert set(rec["summary"]) == set(bench.ARMS) and all(set(v) == {"4 req/s", "16 req/s"}
                                                          for v in rec["summary"].values())
    models = rec["models"]
    assert models["adapters"] == ["addition", "sorting", "unit_conversion", "word_count", "repeat_word",
                                  "reverse_words", "multitask"]  # the demo pool's 7 (n_adapters 8: all there are)
    assert models["mixes"] == ["mix:addition=0.5,sorting=0.5"]
    assert models["routed"]["used"] == {} and models["routed"]["available"] == []  # none built, none built by it
    assert set(models["routed"]["skipped"]) == {"phatgoose", "arrow", "twin", "mole", "smora"}
    assert not (tmp / "artifacts").exists()
    assert raw["models"] == models["adapters"] + models["mixes"]
    assert rec["ignore_eos"]["sent"] in (True, False) and rec["streamed_chunks_short_of_tokens"] == 0
    assert rec["machine"]["cpus"] and rec["git"].keys() >= {"commit", "dirty"}
    # files beside the record, named relative to it; no absolute machine path anywhere in the record
    assert rec["raw"] == "serve-open.raw.json.gz" and rec["plot"] == "serve-open.svg"
    assert (out.parent / rec["plot"]).read_text().lstrip().startswith("<svg")
    text = out.read_text()
    assert str(tmp) not in text and str(ROOT) not in text and "/home/" not in text and "/root/" not in text
    # the app reads it as a benchmark record, with the targets beside their ratios
    from workbench import catalog

    cat = catalog.scan(out.parent.parent)
    assert not cat.warnings and [b["benchmark"] for b in cat.benches] == ["serve-open"]
    ratios = {r["name"]: r for r in catalog.bench_ratios(cat.benches[0])}
    assert ratios["4 req/s.short_ttft_p95_continuous_x_static"]["target"] == "<= 0.2"
    assert ratios["16 req/s.tokens_per_s_adapters_x_base"]["target"] == ">= 0.9"


def test_arrivals_are_the_seeded_poisson_sequence_and_every_arm_gets_the_same_requests(bench_run):
    rec, raw, _, _ = bench_run
    seed, n = SETTINGS["seed"], SETTINGS["requests"]
    gaps = np.random.default_rng([seed, 0]).standard_exponential(n)
    assert len(raw["runs"]) == len(bench.ARMS) * len(SETTINGS["rates"])
    for rate in SETTINGS["rates"]:
        runs = {r["arm"]: r["requests"] for r in _runs(raw, rate=rate)}
        assert set(runs) == set(bench.ARMS)
        for reqs in runs.values():
            assert [q["i"] for q in reqs] == list(range(n))
            np.testing.assert_allclose([q["arrival_s"] for q in reqs], np.cumsum(gaps) / rate, atol=2e-6)
        # the same requests (lengths, prompts, arrivals) in every arm; continuous and static: the same models too
        same = [[(q["i"], q["max_tokens"], q["prompt"], q["arrival_s"]) for q in reqs] for reqs in runs.values()]
        assert all(s == same[0] for s in same)
        assert [q["model"] for q in runs["continuous"]] == [q["model"] for q in runs["static"]]
        assert all(q["model"] in raw["models"] for q in runs["continuous"])
        assert [q["model"] for q in runs["base"]] == ["base"] * n
        assert [q["model"] for q in runs["adapters"]] == rec["models"]["adapters"][:n]
        assert all(SETTINGS["min_tokens"] <= q["max_tokens"] <= SETTINGS["max_tokens"] for q in runs["static"])
    # the same workload at every rate, compressed in time
    lo, hi = (_runs(raw, "continuous", r)[0]["requests"] for r in SETTINGS["rates"])
    assert [(q["model"], q["max_tokens"], q["prompt"]) for q in lo] == [(q["model"], q["max_tokens"], q["prompt"])
                                                                         for q in hi]


def test_each_request_streamed_token_by_token_and_its_counts_match_usage_and_the_server(bench_run):
    _, raw, _, _ = bench_run
    gaps = []
    for run in raw["runs"]:
        for q in run["requests"]:
            assert q["error"] is None, q
            assert q["sent_s"] >= q["arrival_s"]  # open loop: never sent before its arrival
            chunks = q["chunk_s"]
            assert chunks == sorted(chunks) and q["sent_s"] <= chunks[0] and chunks[-1] <= q["end_s"]
            ttft, e2e = chunks[0] - q["arrival_s"], q["end_s"] - q["arrival_s"]
            assert 0 < ttft <= e2e
            # one chunk per generated token; the counting prompt runs every request to its length
            assert len(chunks) == q["tokens"] == q["max_tokens"] and q["finish_reason"] == "length"
            gaps += [b - a for a, b in itertools.pairwise(chunks)]
        # the server's own count of what it generated and admitted during the run
        assert run["stats"]["tokens"] == sum(q["tokens"] for q in run["requests"])
        assert run["stats"]["sequences"] == len(run["requests"])
        if run["arm"] == "static":
            assert run["stats"]["joined_running"] == 0  # static batching: nobody joins a running batch
    # the tokens arrived a decode step apart, as they were made (streamed, not one buffered answer): a forward of
    # SmolLM2-135M's 30 layers takes well over a millisecond (most gaps: a stalled client may read two at once)
    assert len(gaps) > 20 and sum(g >= 1e-3 for g in gaps) >= 0.75 * len(gaps)


def test_figures_and_ratios_recompute_from_the_raw_data(bench_run):
    rec, raw, _, _ = bench_run
    short = SETTINGS["short_tokens"]
    for arm in bench.ARMS:
        for rate in SETTINGS["rates"]:
            fig = rec["summary"][arm][bench.rate_key(rate)]
            runs = _runs(raw, arm, rate)
            reqs = [q for r in runs for q in r["requests"]]
            ttft = [q["chunk_s"][0] - q["arrival_s"] for q in reqs]
            short_ttft = [q["chunk_s"][0] - q["arrival_s"] for q in reqs if q["max_tokens"] <= short]
            itl = np.concatenate([np.diff(q["chunk_s"]) for q in reqs])
            e2e = [q["end_s"] - q["arrival_s"] for q in reqs]
            tokens = sum(q["tokens"] for q in reqs)
            assert fig["requests"] == len(reqs) == SETTINGS["requests"] and fig["errors"] == 0
            assert fig["output_tokens"] == tokens and fig["short_requests"] == len(short_ttft)
            assert fig["ttft_p95_s"] == pytest.approx(np.percentile(ttft, 95), abs=2e-6)
            assert fig["ttft_p50_s"] == pytest.approx(np.percentile(ttft, 50), abs=2e-6)
            if short_ttft:
                assert fig["short_ttft_p95_s"] == pytest.approx(np.percentile(short_ttft, 95), abs=2e-6)
            else:
                assert fig["short_ttft_p95_s"] is None
            assert fig["itl_p50_s"] == pytest.approx(np.percentile(itl, 50), abs=2e-6)
            assert fig["itl_p95_s"] == pytest.approx(np.percentile(itl, 95), abs=2e-6)
            assert fig["e2e_p95_s"] == pytest.approx(np.percentile(e2e, 95), abs=2e-6)
            assert fig["ttft_p95_s"] <= fig["e2e_p95_s"]
            duration = max(q["end_s"] for q in reqs)
            assert fig["tokens_per_s"] == pytest.approx(tokens / duration, rel=1e-5)
            assert fig["requests_per_s"] == pytest.approx(len(reqs) / duration, rel=1e-5)
            assert fig["offered_requests_per_s"] == rate
    for key, ratios in rec["ratios"].items():
        s = {arm: rec["summary"][arm][key] for arm in bench.ARMS}
        assert ratios["tokens_per_s_adapters_x_base"] == pytest.approx(
            s["adapters"]["tokens_per_s"] / s["base"]["tokens_per_s"], abs=1e-4)
        assert ratios["ttft_p95_continuous_x_static"] == pytest.approx(
            s["continuous"]["ttft_p95_s"] / s["static"]["ttft_p95_s"], abs=1e-4)
        for name, target in bench.TARGETS.items():
            if name in ratios:
                bound = float(target.split()[1])
                want = ratios[name] <= bound if target.startswith("<=") else ratios[name] >= bound
                assert rec["targets_met"][name]["per_rate"][key] is want


def test_arms_are_interleaved_and_rotated(bench_run):
    rec, raw, _, _ = bench_run
    assert [[r["rep"], r["rate"], r["arm"]] for r in raw["runs"]] == rec["order"]
    for rate in SETTINGS["rates"]:  # every arm measured at a rate before the next rate
        block = [arm for _, r, arm in rec["order"] if r == rate]
        assert sorted(block) == sorted(bench.ARMS)
    firsts = {order[0][2] for order in ([o for o in bench.run_order(4, (1.0,), bench.ARMS) if o[0] == rep]
                                         for rep in range(4))}
    assert firsts == set(bench.ARMS)  # over the rounds, each arm goes first once


@pytest.mark.parametrize("options, words", [
    ({"rates": (0.0,)}, "rates.0"),
    ({"rates": (float("nan"),)}, "rates.0"),
    ({"rates": (1.0, 1.0)}, "repeat"),
    ({"rates": ()}, "rates"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"arms": ("continuous", "bogus")}, "arms.1"),
    ({"requests": 0}, "requests"),
    ({"rates": (100.0,), "duration_s": 3600}, "per run"),
    ({"reps": 21}, "reps"),
    ({"request_timeout_s": float("inf")}, "request_timeout_s"),
    ({"bogus": 1}, "unknown option 'bogus'"),
])
def test_bad_settings_are_refused_in_one_line_before_any_work(options, words, tmp_path):
    with pytest.raises(WorkbenchError) as e:
        bench.run(mode="open", pool_name="no-such-pool", out_file=tmp_path / "x.json", log=quiet, **options)
    assert words in one_line(e)
    assert not list(tmp_path.iterdir())


def test_modes_and_the_closed_loop_options_are_checked_too():
    with pytest.raises(WorkbenchError, match="mode 'half': closed or open"):
        bench.run(mode="half")
    with pytest.raises(WorkbenchError) as e:  # the closed loop (the default mode) keeps its own options
        bench.run(pool_name="demo", n_request=4)
    assert "unknown option 'n_request' (did you mean 'n_requests'?)" in one_line(e)
