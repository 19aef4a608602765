"""Results users can trust: tests that bite where earlier ones could not (issue: 'Results users can trust')."""

import json

import pytest
import torch
from conftest import add_two_experts, suite_data


@pytest.mark.parametrize("temperature", [0.25, 4.0])
def test_routed_module_output_by_hand_with_temperature_and_top2(pool, tiny_dir, temperature):
    """A routed q_proj's output, built from a recipe with k = 2 and a temperature other than 1, equals
    W0 x + sum_j softmax(top2(|x . p|) / T)_j * s_j B_j A_j x computed by hand from the artifact's prototype file and
    the experts' own LoRA files. A router that ignored its temperature (or a build that dropped it) fails here."""
    from safetensors.torch import load_file

    from workbench.artifacts import load_artifact
    from workbench.modules.routed_lora import RoutedLoraLinear
    from workbench.recipes import build, parse_recipe

    add_two_experts(pool, tiny_dir)
    resolved = parse_recipe({"name": f"arrow-t{temperature}", "method": "arrow", "pool": "demo",
                             "parameters": {"k": 2, "temperature": temperature}})
    art = build(resolved, log=lambda *a: None)
    assert json.loads((art / "router.json").read_text())["config"]["temperature"] == temperature
    loaded = load_artifact(art)
    name = "model.layers.0.self_attn.q_proj"  # adapted by both experts: both are candidates for every token
    module = dict(loaded.model.named_modules())
    layer = next(m for n, m in module.items() if n.endswith(name) and isinstance(m, RoutedLoraLinear))
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    ids = loaded.tokenizer("12+30=7", return_tensors="pt").input_ids
    with torch.no_grad():
        loaded.model(input_ids=ids)
    hook.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).float()
    protos = load_file(str(art / "router.safetensors"))[name]  # [E, d_in], E in the recipe's expert order
    scores = (x @ protos.T).abs()  # Arrow: |x . p|, no standardisation, no scaling
    top = scores.topk(2, dim=-1)
    w = torch.exp(top.values / temperature)
    w = w / w.sum(-1, keepdim=True)
    y = x @ layer.base.weight.float().T
    for slot in range(2):
        for e, expert in enumerate(["addition", "sorting"]):
            a, b, s = pool.expert(expert).lora_factors(f"{name}.weight")
            chosen = (top.indices[:, slot] == e).float()[:, None]
            y = y + chosen * w[:, slot:slot + 1] * s * (x @ a.T) @ b.T
    assert torch.allclose(seen["y"].reshape(y.shape).float(), y, atol=1e-5, rtol=1e-4)
    # the temperature matters here: the two weights of a token are far from what T = 1 gives
    w1 = torch.softmax(top.values, dim=-1)
    assert (w - w1).abs().max() > 0.02


def test_router_accuracy_in_topk_is_not_trivially_one(pool, tiny_dir):
    """MoLE's dense gates weigh every expert for every token: 'own expert in top-k' has no meaning there and is
    reported as None (it read 1.0 for any gate). A top-1 prototype router's in-top-k equals its top-1."""
    from workbench.artifacts import load_artifact
    from workbench.methods.routing import router_accuracy
    from workbench.recipes import build, parse_recipe

    add_two_experts(pool, tiny_dir)
    tasks = {"addition": "addition", "sorting": "sorting"}
    quiet = lambda *a: None  # noqa: E731
    mole = load_artifact(build(parse_recipe({"name": "mole-acc", "method": "mole", "pool": "demo", "parameters": {
        "steps": 1, "examples": 4, "batch_size": 2}}), log=quiet))
    rec = router_accuracy(mole.model, mole.tokenizer, tasks, n=2)
    assert rec["k"] is None and rec["summary"]["mean_in_topk"] is None
    assert all(v["in_topk"] is None and 0 <= v["mean_top1"] <= 1 for v in rec["tasks"].values())
    arrow = load_artifact(build(parse_recipe({"name": "arrow-acc", "method": "arrow", "pool": "demo",
                                              "parameters": {"k": 1}}), log=quiet))
    rec = router_accuracy(arrow.model, arrow.tokenizer, tasks, n=2)
    assert rec["k"] == 1 and all(v["in_topk"] == v["top1"] for v in rec["tasks"].values())
    arrow2 = load_artifact(build(parse_recipe({"name": "arrow-acc2", "method": "arrow", "pool": "demo",
                                               "parameters": {"k": 2}}), log=quiet))
    rec = router_accuracy(arrow2.model, arrow2.tokenizer, tasks, n=2)
    # two experts, k = 2: a token's own expert is in its top 2 exactly where that expert adapts the module (3 of the
    # layer's 5 routed modules: q, v, down for one expert, q, o, up for the other), so in-top-k is 3/5 in every layer
    assert rec["k"] == 2
    for v in rec["tasks"].values():
        assert v["in_topk"] == pytest.approx([0.6] * len(v["layers"])) and all(
            t <= k for t, k in zip(v["top1"], v["in_topk"]))


def test_two_pool_objects_adding_lose_no_entry(pools, tiny_dir, pool):
    """Two Pool objects (two processes, two notebooks) opened before either adds: both experts land (the manifest is
    re-read under the pool's lock before each write; it was overwritten by the stale copy)."""
    from workbench.pool import Pool

    p1, p2 = Pool.open("demo"), Pool.open("demo")
    p1.add(tiny_dir / "lora_a", "x")
    p2.add(tiny_dir / "lora_b", "y")
    assert Pool.open("demo").names() == ["x", "y"]
    p1.remove("x")  # p1 never saw y: removing x keeps it
    assert Pool.open("demo").names() == ["y"]


@pytest.mark.parametrize("fault", ["pool_replace", "pool_replace_in"])
def test_replace_killed_midway_is_undone(pools, tiny_dir, pool, fault):
    """SIGKILL during `add --replace`: after the old expert folder was renamed aside and before the new one came in
    (`pool_replace`), or after the new one came in and before the manifest named its files (`pool_replace_in`).
    Either way the next open puts the old folder back (the manifest still names its files): `verify` passes, the old
    expert is not lost, and the replace can then be done to the end, leaving nothing aside."""
    import os
    import subprocess
    import sys

    from workbench.pool import Pool

    pool.add(tiny_dir / "lora_a", "a")
    before = Pool.open("demo").expert("a").entry.files
    code = ("from workbench.pool import Pool; import sys; "
            "Pool.open('demo').add(sys.argv[1], 'a', replace=True)")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_dir / "lora_b")], capture_output=True, text=True,
                          env={**os.environ, "WORKBENCH_FAULT": fault}, timeout=120)
    assert proc.returncode == -9 and f"killed at {fault} #" in proc.stderr
    assert list((pools / "demo" / ".staging").glob(".old-*"))  # the old folder aside
    # between the renames nothing is at experts/a; after them the new files are, unnamed by the manifest
    assert (pools / "demo" / "experts" / "a").exists() == (fault == "pool_replace_in")
    p = Pool.open("demo")
    assert (pools / "demo" / "experts" / "a").is_dir() and p.expert("a").entry.files == before
    assert p.verify() == [] and not list((pools / "demo" / ".staging").glob(".old-*"))
    p.add(tiny_dir / "lora_b", "a", replace=True)  # a replace that completes leaves nothing aside
    assert Pool.open("demo").expert("a").entry.files != before and Pool.open("demo").verify() == []
    assert not list((pools / "demo" / ".staging").glob(".old-*"))


def test_the_apps_build_one_form_with_nothing_selected_is_refused(pools, tiny_dir, pool):
    """An empty expert selection is a one-line error, never TIES over the whole pool."""
    from workbench.comparison import parse_comparison
    from workbench.errors import WorkbenchError
    from workbench.jobs import comparison_document

    add_two_experts(pool, tiny_dir)
    doc = comparison_document("demo", "ties", {"density": 0.5}, experts=[])
    with pytest.raises(WorkbenchError, match=r"lists no expert") as info:
        parse_comparison(doc, "<app>")
    assert "\n" not in str(info.value)


def test_concurrent_pool_adds_in_processes_all_land(pools, tiny_dir, pool):
    """Three processes adding two experts each at the same moment: six entries, every folder where its entry says."""
    import os
    import subprocess
    import sys
    import time

    from workbench.pool import Pool

    start = time.time() + 3  # every process opens the pool first, then all add at once
    code = ("import sys, time; from workbench.pool import Pool; p = Pool.open('demo'); t = float(sys.argv[1])\n"
            "time.sleep(max(0.0, t - time.time()))\n"
            "for i in range(2): p.add(sys.argv[2], f'p{sys.argv[3]}-{i}')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start), str(tiny_dir / ("lora_a", "lora_b")[j % 2]),
                               str(j)], env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
             for j in range(3)]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read()
    p = Pool.open("demo")
    assert sorted(p.names()) == sorted(f"p{j}-{i}" for j in range(3) for i in range(2))
    assert p.verify() == []


def test_upcycle_checkpoints_are_keyed_by_the_output_too(pools, tiny_dir, pool, tmp_path):
    """Two artifacts that differ only in their output spec never train into one checkpoint folder (the first to
    finish deleted the other's checkpoints)."""
    from workbench.methods import METHODS
    from workbench.methods.base import BuildContext, OutputSpec

    pool.add(tiny_dir / "full_c", "a", tags={"task": "addition"}, data=suite_data("addition"), link=True)
    pool.add(tiny_dir / "full_c", "b", tags={"task": "sorting"}, data=suite_data("sorting"), link=True)
    btx = METHODS.get("btx")()
    params = btx.Params.model_validate({})
    dirs = {btx.checkpoint_dir(BuildContext(pool=pool, experts=pool.experts, params=params, output=out,
                                            out_dir=tmp_path / "artifacts" / ".staging-x"))
            for out in (OutputSpec(kind="model"), OutputSpec(kind="lora", rank=4))}
    assert len(dirs) == 2


def test_mole_gates_from_is_keyed_by_content_and_a_missing_router_is_one_line(pools, tiny_dir, pool, tmp_path):
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from workbench.errors import RecipeError
    from workbench.recipes import build, parse_recipe

    add_two_experts(pool, tiny_dir)
    params = {"steps": 1, "examples": 4, "batch_size": 2}
    first = build(parse_recipe({"name": "mole-g", "method": "mole", "pool": "demo", "parameters": params}),
                  log=lambda *a: None)
    same, other, broken = tmp_path / "same", tmp_path / "other", tmp_path / "broken"
    for d in (same, other, broken):
        shutil.copytree(first, d)
    os.utime(same / "router.safetensors", ns=(1, 1))  # same gates, another mtime
    t = load_file(str(other / "router.safetensors"))
    save_file({k: v + 1 for k, v in t.items()}, str(other / "router.safetensors"))  # other gates, the same mtime
    st = os.stat(first / "router.safetensors")
    os.utime(other / "router.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    (broken / "router.safetensors").unlink()

    def key(folder):
        return parse_recipe({"name": "mole-u", "method": "mole", "pool": "demo",
                             "parameters": {**params, "gates_from": str(folder)}}).key

    assert key(same) != key(other)  # other gates in a folder whose mtime is not new
    before = key(other)
    save_file({k: v + 2 for k, v in t.items()}, str(other / "router.safetensors"))  # rewritten in place, same size
    os.utime(other / "router.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert key(other) != before  # the mtime-keyed input kept the key, and a stale build would have been reused
    with pytest.raises(RecipeError, match="no router.safetensors") as info:
        key(broken)
    assert "\n" not in str(info.value)
    (broken / "artifact.json").write_text("[" * 100_000 + "]" * 100_000)  # a deep file: one line, no RecursionError
    with pytest.raises(RecipeError, match="not a built artifact .*nested too deeply") as info:
        key(broken)
    assert "\n" not in str(info.value)


def test_sweep_scores_are_reused_only_under_the_same_eval_settings(pools, tiny_dir, pool, tmp_path):
    """A validation sweep's recorded scores are keyed like cells: another batch size (or task configuration,
    lm-eval version, device) scores the points again instead of reusing them."""
    from workbench.recipes import parse_recipe, run_sweep

    add_two_experts(pool, tiny_dir)

    def sweep(batch_size):
        lines = []
        doc = {"name": "sw", "method": "task_arithmetic", "pool": "demo", "sweep": {
            "parameters": {"lambda": [0.5, 1.0]}, "tasks": ["addition"], "limit": 2, "batch_size": batch_size}}
        run_sweep(parse_recipe(doc), results_dir=tmp_path, log=lines.append)
        return [x for x in lines if x.startswith("sweep ")]

    assert not any("(cached)" in x for x in sweep(8))
    assert all("(cached)" in x for x in sweep(8))  # the same settings: reused
    assert not any("(cached)" in x for x in sweep(4))  # another batch size: scored again


def test_leaderboard_markdown_prints_perplexities_as_perplexities():
    """The upcycle leaderboard's Markdown printed word perplexities times 100 (base english_docs 14691, not 146.9)."""
    from pathlib import Path

    from workbench.eval.leaderboard import leaderboard_markdown

    board = json.loads((Path(__file__).resolve().parents[1] / "results" / "compare" / "upcycle" / "leaderboard.json")
                       .read_text())
    base = next(r for r in board["rows"] if r["name"] == "base")
    ppl = base["tasks"]["english_docs"]
    assert ppl["metric"] != "exact_match" and 100 < ppl["mean"] < 200
    md = leaderboard_markdown(board, "upcycle")
    row = next(line for line in md.splitlines() if line.startswith("| base |"))
    assert f"{ppl['mean']:.4g}" in row and f"{100 * ppl['mean']:.1f}" not in row
    assert "lower is better for perplexities" in md


def test_key_sees_validated_params_not_their_spelling_and_the_base_weights(pools, tiny_dir, tmp_path, monkeypatch):
    """A default spelled out (`seed: 0`, as a comparison injects it) is the same artifact; other base weights of the
    same shapes (a re-quantised base) under the SAME pool name and experts are another."""
    import shutil

    from safetensors.torch import load_file, save_file

    from workbench.pool import Pool
    from workbench.recipes import parse_recipe

    pool = Pool.create("p", base=str(tiny_dir / "base"))
    add_two_experts(pool, tiny_dir)
    r = {"name": "t", "pool": "p", "method": "twin", "experts": ["addition", "sorting"]}
    plain = parse_recipe(r).key
    assert parse_recipe({**r, "parameters": {"seed": 0}}).key == plain
    assert parse_recipe({**r, "parameters": {"seed": 1}}).key != plain
    # the same config and shapes, other weights, the same pool name and experts: the fingerprint agrees, the key not
    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir / "base", other)
    w = load_file(str(other / "model.safetensors"))
    w = {k: v + 1e-3 if v.is_floating_point() else v for k, v in w.items()}
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setenv("WORKBENCH_POOLS", str(tmp_path / "other-pools"))
    twin = Pool.create("p", base=str(other))
    for name, src in (("addition", "lora_a"), ("sorting", "lora_b")):
        twin.add(tiny_dir / src, name, tags={"task": name}, data=suite_data(name), allow_distant=True)
    assert twin.manifest.base.fingerprint == pool.manifest.base.fingerprint
    assert parse_recipe(r).key != plain


def test_a_build_is_byte_identical_whatever_the_callers_threads(pools, tmp_path):
    """Twin's SVDs and router on a model wide enough for torch to split its reductions by thread (hidden 512):
    built with the caller on 1 thread and on 2, the artifact files are the same bytes (builds run on BUILD_THREADS)."""
    from workbench.pool import Pool
    from workbench.recipes import build, parse_recipe
    from workbench.testing import make_tiny_base, make_tiny_lora

    base = make_tiny_base(tmp_path / "wide", seed=0, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                          num_key_value_heads=8, num_hidden_layers=1)
    pool = Pool.create("w", base=str(base))
    for i, t in enumerate(("addition", "sorting")):
        pool.add(make_tiny_lora(base, tmp_path / f"l{i}", seed=i + 1, r=16, target_modules=("q_proj", "down_proj")),
                 t, data=suite_data(t))
    recipe = parse_recipe({"name": "t", "pool": "w", "method": "twin", "experts": ["addition", "sorting"],
                           "parameters": {"rank": 8, "router_examples": 32, "router_epochs": 2}})
    before = torch.get_num_threads()
    files = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = build(recipe, force=True, log=lambda *a: None)
            files.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
            assert torch.get_num_threads() == threads  # restored after the build
    finally:
        torch.set_num_threads(before)
    assert files[0] and files[0] == files[1]


def test_dry_run_names_the_key_input_that_changed(pools, tiny_dir, tmp_path, run_cli, arts):
    """A comparison's build is redone when its key changes; --dry-run says which input changed (the recorded key
    body against the current one)."""
    import yaml

    from workbench.pool import Pool

    pool = Pool.create("p", base=str(tiny_dir / "base"))
    add_two_experts(pool, tiny_dir)
    doc = {"name": "c", "pool": "p", "tasks": ["addition"], "eval": {"limit": 2, "batch_size": 2},
           "entries": [{"name": "ties", "method": "ties", "parameters": {"density": 0.5}}]}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    results = tmp_path / "results"
    code, out, err = run_cli("compare", str(f), "--results", str(results))
    assert code == 0, err
    code, out, err = run_cli("compare", str(f), "--dry-run", "--results", str(results))
    assert "build ties (ties): done" in out
    doc["entries"][0]["parameters"]["density"] = 0.7
    f.write_text(yaml.safe_dump(doc))
    code, out, err = run_cli("compare", str(f), "--dry-run", "--results", str(results))
    assert code == 0 and "build ties (ties): todo (changed: params.density)" in out, out
    pool.set_data("sorting", suite_data("reverse_words"))  # ties reads no data: still only the density differs
    code, out, err = run_cli("compare", str(f), "--dry-run", "--results", str(results))
    assert "todo (changed: params.density)" in out, out


def test_a_limit_covering_the_whole_split_keys_as_the_whole_split(pools, tiny_dir):
    """limit: 100 000 on 100-example splits is the whole split: its cells key (and are reused) as `limit: None`'s;
    a limit below a split's size is its own key; a task the suite does not know keeps the limit as given."""
    from workbench.comparison import cell_key, parse_comparison
    from workbench.pool import Pool
    from workbench.tasks.suite import effective_limit, load_split

    pool = Pool.create("p", base=str(tiny_dir / "base"))
    add_two_experts(pool, tiny_dir)
    size = len(load_split("addition", "test"))

    def key(limit):
        doc = {"name": "c", "pool": "p", "tasks": ["addition"], "eval": {"limit": limit, "batch_size": 2},
               "entries": ["base"]}
        return cell_key(parse_comparison(doc), {"row": "base"}, "addition")

    assert key(100_000) == key(size) == key(None)
    assert key(size - 1) != key(None) and key(20) != key(size - 1)
    assert effective_limit(size, ["addition", "sorting"], "validation") is None
    assert effective_limit(size, ["addition", "my_own_task"], "test") == size


def test_two_processes_needing_the_same_gates_train_each_once(pools, tiny_dir, pool):
    """Two builds at the same moment (PHATGOOSE k = 1 and k = 2: other artifacts, the same gates) train each
    expert's gate once: the second waits on the gate's lock, then reads what the first cached."""
    import os
    import subprocess
    import sys
    import time

    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    start = time.time() + 4  # both processes import and open the pool first, then build at once
    code = ("import sys, time; from workbench.recipes import build, parse_recipe; t = float(sys.argv[1])\n"
            "r = parse_recipe({'name': 'pg' + sys.argv[2], 'method': 'phatgoose', 'pool': 'demo', 'parameters':"
            " {'k': int(sys.argv[2]), 'steps': 12, 'examples': 16, 'accumulation': 1}})\n"
            "time.sleep(max(0.0, t - time.time()))\n"
            "build(r, log=print)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start), str(k)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        outs.append(out)
    trained = [line for out in outs for line in out.splitlines() if ": training (" in line]
    cached = [line for out in outs for line in out.splitlines() if line.endswith(": cached")]
    assert len(trained) == 2 and len(cached) == 2, outs


# Every method, small settings: one key gives one model, whatever the process and its thread count.
_EVERY_METHOD = [
    ("task_arithmetic", {"lambda": 0.5}),
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("pcb", {"ratio": 0.2}),
    ("twin", {"rank": 8, "router_examples": 16, "router_epochs": 2}),
    ("arrow", {"k": 1}),
    ("avg_act", {"k": 1, "examples": 8}),
    ("phatgoose", {"k": 1, "steps": 3, "examples": 8, "batch_size": 4, "accumulation": 2}),
    ("mole", {"steps": 3, "examples": 4, "batch_size": 4, "warmup": 1}),
    ("smora", {"rank": 8, "k": 2, "steps": 3, "batch_size": 4, "warmup": 1}),
    ("btx", {"materialize": True, "steps": 2, "batch_size": 2, "examples": 4, "warmup": 1}),
    ("bam", {"materialize": True, "steps": 2, "batch_size": 2, "examples": 4, "warmup": 1}),
    ("mergekit_moe", {"materialize": True, "steps": 2, "batch_size": 2, "examples": 4, "warmup": 1, "prompts": 4}),
]


def test_every_method_builds_the_same_bytes_in_fresh_processes_with_other_thread_counts(pools, tmp_path):
    """Each method built in two fresh processes, one with 1 thread and one with 2 (each with its own artifact
    cache): every saved tensor file, byte for byte, the same (a wide base, so that torch splits reductions by
    thread)."""
    import os
    import subprocess
    import sys

    from workbench.pool import Pool
    from workbench.testing import make_tiny_base, make_tiny_lora

    base = make_tiny_base(tmp_path / "wide", seed=0, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                          num_key_value_heads=8, num_hidden_layers=1)
    pool = Pool.create("w", base=str(base))
    for i, (t, mods) in enumerate((("addition", ("q_proj", "down_proj")), ("sorting", ("q_proj", "v_proj")))):
        pool.add(make_tiny_lora(base, tmp_path / f"l{i}", seed=i + 1, r=8, target_modules=mods), t,
                 data=suite_data(t))
    code = (
        "import hashlib, json, sys\n"
        "from pathlib import Path\n"
        "from workbench.recipes import build, parse_recipe\n"
        "out = {}\n"
        "for method, params in json.loads(sys.argv[1]):\n"
        "    art = build(parse_recipe({'name': method, 'pool': 'w', 'method': method, 'experts': ['addition', 'sorting'],"
        " 'parameters': params}), log=lambda *a: None)\n"
        "    out[method] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(art).rglob('*.safetensors'))}\n"
        "print(json.dumps(out))\n")
    got = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "WORKBENCH_CACHE_ARTIFACTS": str(tmp_path / f"arts{threads}")}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(_EVERY_METHOD)], env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert set(got[0]) == {m for m, _ in _EVERY_METHOD}
    differ = []
    for method, _ in _EVERY_METHOD:
        assert got[0][method], method  # something saved
        if got[0][method] != got[1][method]:
            differ.append(method)
    assert set(differ) <= _KNOWN_NONDETERMINISTIC, differ
    if differ:
        pytest.xfail(f"known, not yet found: {differ} gave other bytes in the other process")


# PCB's whole-model build once gave other bytes in the 2-thread process (a fresh-clone CI run at ee8ea1e; four local
# reruns agreed, and six more fresh processes with 1 and 2 OpenMP/OpenBLAS threads, and builds pinned to 1, 2 and 3
# torch threads, all gave the 1-thread process's bytes): a defect not yet found, kept visible here instead of dropped
# from the test (issue 26). PCB's one numpy op (ndarray.partition) uses no BLAS and no threads: see docs/results.md.
_KNOWN_NONDETERMINISTIC = {"pcb"}


# ----------------------------------------------------------------------------- issue 26's review: locks beside the resource


def test_pool_adds_from_processes_with_their_own_caches_all_land(pools, tiny_dir, pool, tmp_path):
    """Three processes, each with its own $WORKBENCH_CACHE, adding two experts each to one pool at the same moment:
    six entries (the pool's lock is beside its manifest, not in a cache the writers do not share)."""
    import os
    import subprocess
    import sys
    import time

    from workbench.io import lock_for
    from workbench.pool import Pool

    assert lock_for(pool.root / "pool.json") == pool.root.resolve()  # the pool folder itself: no file in it
    start = time.time() + 3
    code = ("import sys, time; from workbench.pool import Pool; p = Pool.open('demo'); t = float(sys.argv[1])\n"
            "time.sleep(max(0.0, t - time.time()))\n"
            "for i in range(2): p.add(sys.argv[2], f'p{sys.argv[3]}-{i}')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start), str(tiny_dir / ("lora_a", "lora_b")[j % 2]),
                               str(j)], env={**os.environ, "OMP_NUM_THREADS": "1",
                                             "WORKBENCH_CACHE": str(tmp_path / f"cache-{j}")},
                              stderr=subprocess.PIPE, text=True) for j in range(3)]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read()
    p = Pool.open("demo")
    assert sorted(p.names()) == sorted(f"p{j}-{i}" for j in range(3) for i in range(2))
    assert p.verify() == []


def _full_pool(pool, tiny_dir, tmp_path):
    from workbench.testing import make_tiny_full

    pool.add(tiny_dir / "full_c", "fa", tags={"task": "addition"}, data=suite_data("addition"), link=True)
    pool.add(make_tiny_full(tiny_dir / "base", tmp_path / "full_d", seed=4), "fb", tags={"task": "sorting"},
             data=suite_data("sorting"), link=True)
    return pool


def test_a_killed_mergekit_moe_build_leaves_nothing_beside_the_artifacts(pools, tiny_dir, pool, arts, tmp_path):
    """mergekit-moe's temp folder lives in the build's own staging folder: SIGKILLed mid-build (after materialising
    the experts), nothing `wb-mergekit-moe-*` is left beside the artifacts; the dead build's `.staging-*` folder (with
    the temp folder in it) is removed by the next build of ANY key, and only once nobody holds its key's lock."""
    import os
    import subprocess
    import sys

    from workbench.io import file_lock
    from workbench.recipes import build, parse_recipe

    _full_pool(pool, tiny_dir, tmp_path)
    recipe = {"name": "mk", "method": "mergekit_moe", "pool": "demo", "experts": ["fa", "fb"],
              "parameters": {"steps": 0, "prompts": 2}}
    code = ("import json, sys\nfrom workbench.recipes import build, parse_recipe\n"
            "build(parse_recipe(json.loads(sys.argv[1])), log=lambda *a: None)\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(recipe)], check=False, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_FAULT": "mergekit_moe"})
    assert r.returncode == -9 and "WORKBENCH_FAULT: killed at mergekit_moe #1" in r.stderr, r.stderr[-2000:]
    assert not list(arts.glob("wb-mergekit-moe-*"))  # nothing of its own beside the artifacts
    (staged,) = arts.glob(".staging-mergekit_moe-*")
    assert list(staged.glob("wb-mergekit-moe-*/expert-0"))  # the temp folder went down with the staging folder
    key_name = staged.name[len(".staging-"):].rpartition("-")[0]
    assert key_name == parse_recipe(recipe).artifact_dir.name
    legacy = arts / "wb-mergekit-moe-old123"  # what an older version left beside the artifacts
    legacy.mkdir()

    other = parse_recipe({"name": "ta", "method": "task_arithmetic", "pool": "demo", "experts": ["fa", "fb"]})
    logs: list[str] = []
    with file_lock(arts / f".{key_name}.lock"):  # a live builder of that key: its staging folder is its own
        build(other, log=logs.append)
    assert staged.is_dir() and legacy.is_dir()
    build(other, force=True, log=logs.append)  # the owner is gone (nobody holds the lock): cleaned
    assert not staged.exists() and not legacy.exists()
    assert any(line.startswith(f"removed {staged.name} ") for line in logs), logs


# ----------------------------------------------------------------------------- issue 26's review: keys that see the base


def _same_named_pool_over(pools_root, base, tiny_dir, monkeypatch):
    """A pool named `p` (the experts `addition` and `sorting`) over `base`, in its own pools folder."""
    from workbench.pool import Pool

    monkeypatch.setenv("WORKBENCH_POOLS", str(pools_root))
    pool = Pool.create("p", base=str(base))
    for name, src in (("addition", "lora_a"), ("sorting", "lora_b")):
        pool.add(tiny_dir / src, name, tags={"task": name}, data=suite_data(name), allow_distant=True)
    return pool


def _keys(pool_root):
    """(artifact key, base row's cell key, expert row's cell key) of pool `p` as it is now."""
    from workbench.comparison import cell_key, parse_comparison
    from workbench.recipes import parse_recipe

    art = parse_recipe({"name": "t", "pool": "p", "method": "ties", "parameters": {"density": 0.5}}).key
    c = parse_comparison({"name": "c", "pool": "p", "entries": ["base", "addition"], "tasks": ["addition"],
                          "eval": {"limit": 2, "batch_size": 2}}, "c.yaml")
    return art, cell_key(c, c.row("base").identity(), "addition"), cell_key(c, c.row("addition").identity(), "addition")


def test_keys_see_the_base_weights_alone(tiny_dir, tmp_path, monkeypatch):
    """Two pools of ONE name, the same experts, bases of the same config, shapes and tokenizer: only the weights
    differ (a re-quantised base). The artifact key and the base and expert rows' cell keys all differ."""
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir / "base", other)
    w = load_file(str(other / "model.safetensors"))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in w.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    a = _same_named_pool_over(tmp_path / "pools-a", tiny_dir / "base", tiny_dir, monkeypatch)
    keys_a = _keys(a)
    b = _same_named_pool_over(tmp_path / "pools-b", other, tiny_dir, monkeypatch)
    assert b.manifest.base.fingerprint == a.manifest.base.fingerprint
    assert b.base.tokenizer_sha256 == a.base.tokenizer_sha256  # the same tokenizer files
    keys_b = _keys(b)
    assert [x != y for x, y in zip(keys_a, keys_b)] == [True, True, True], (keys_a, keys_b)


def test_keys_see_the_tokenizer_and_chat_template_of_a_folder_base_not_of_a_gguf_one(tiny_dir, tmp_path,
                                                                                    monkeypatch):
    """The same weights with another chat template: other artifact and cell keys. A GGUF alias's copy (its tokenizer
    comes from the GGUF file, as its weights do) adds nothing to its keys: the demo's keys are as committed."""
    import shutil

    other = tmp_path / "chat-base"
    shutil.copytree(tiny_dir / "base", other)
    template = other / "chat_template.jinja"
    assert template.is_file()
    template.write_text(template.read_text() + "{# another template #}")
    a = _same_named_pool_over(tmp_path / "pools-a", tiny_dir / "base", tiny_dir, monkeypatch)
    keys_a = _keys(a)
    b = _same_named_pool_over(tmp_path / "pools-b", other, tiny_dir, monkeypatch)
    assert b.base.weights_sha256 == a.base.weights_sha256 and a.base.tokenizer_sha256
    keys_b = _keys(b)
    assert [x != y for x, y in zip(keys_a, keys_b)] == [True, True, True], (keys_a, keys_b)

    from workbench.base import BaseModel
    from workbench.comparison import _fingerprint_base
    from workbench.recipes import parse_recipe

    gguf = tmp_path / "gguf-copy"
    shutil.copytree(other, gguf)
    (gguf / "workbench-base.json").write_text(json.dumps({"alias": "smollm2-135m", "source": "/x/SmolLM2.Q4_1.gguf"}))
    assert BaseModel(gguf).tokenizer_sha256 is None
    g = _same_named_pool_over(tmp_path / "pools-g", gguf, tiny_dir, monkeypatch)
    body = parse_recipe({"name": "t", "pool": "p", "method": "ties", "parameters": {"density": 0.5}}).key_body
    assert "base_tokenizer" not in body and "device" not in body
    assert _fingerprint_base(g) == f"{g.manifest.base.fingerprint}+{g.base.weights_sha256}"  # as committed keys


def test_a_device_other_than_the_cpu_is_in_the_artifact_key_and_the_cpu_keys_stay(pools, tiny_dir, pool):
    """One key, one model: a GPU build (other kernels, other bytes) gets its own key; a CPU build's key body has no
    device (committed keys unchanged) and `cuda:0` and `cuda:1` are one kind."""
    from dataclasses import replace

    from workbench.recipes import parse_recipe

    add_two_experts(pool, tiny_dir)
    cpu = parse_recipe({"name": "t", "pool": "demo", "method": "ties", "parameters": {"density": 0.5}})
    gpu, gpu1 = replace(cpu, device="cuda:0"), replace(cpu, device="cuda:1")
    assert "device" not in cpu.key_body and gpu.key_body["device"] == "cuda"
    assert gpu.key != cpu.key and gpu.key == gpu1.key and replace(cpu, device="cpu").key == cpu.key
    assert gpu.artifact_dir != cpu.artifact_dir


def test_training_caches_key_the_device_and_the_base_tokenizer(pools, tiny_dir, pool, tmp_path, monkeypatch):
    """PHATGOOSE's and MoLE's gate caches and SMoRA's and the upcycled MoEs' checkpoint folders are keyed like
    artifacts: a GPU build never reuses gates or checkpoints trained on the CPU (nor the other way), and a base's
    own tokenizer files are in the key; a CPU build over a base without its own tokenizer files (a GGUF base) keys
    as before (no extra field), so shipped gates keep their keys."""
    from workbench.methods import METHODS
    from workbench.methods.base import BuildContext, OutputSpec, cache_key_extras

    add_two_experts(pool, tiny_dir)
    experts = [pool.expert("addition"), pool.expert("sorting")]
    out = tmp_path / "arts" / "x"
    folders = {
        "phatgoose": lambda m, c: m._gate_dir(c, experts[0]),
        "mole": lambda m, c: m._gate_dir(c),
        "smora": lambda m, c: m.train_dir(c),
        "btx": lambda m, c: m.checkpoint_dir(c),
        "bam": lambda m, c: m.checkpoint_dir(c),
    }
    tok = pool.base.tokenizer_sha256
    assert tok  # the tiny base is a folder with its own tokenizer files
    for name, folder in folders.items():
        method = METHODS.get(name)()
        ctx = {d: BuildContext(pool=pool, experts=experts, params=method.Params(), output=OutputSpec(), out_dir=out,
                               device=d) for d in ("cpu", "cuda:0", "cuda:1")}
        cpu, gpu, gpu1 = (folder(method, ctx[d]) for d in ("cpu", "cuda:0", "cuda:1"))
        assert cpu != gpu and gpu == gpu1, name  # the device kind, not which card
        assert cache_key_extras(ctx["cpu"]) == {"base_tokenizer": tok}
        monkeypatch.setattr(type(pool.base), "tokenizer_sha256", property(lambda self: None))
        assert cache_key_extras(ctx["cpu"]) == {} and folder(method, ctx["cpu"]) != cpu, name
        monkeypatch.undo()
        monkeypatch.setenv("WORKBENCH_POOLS", str(pools))


def test_smora_trains_into_its_checkpoint_folder_under_its_lock(pools, tiny_dir, pool, monkeypatch):
    """Two builds of one SMoRA training key never train into one checkpoint folder at once: the training runs with
    the folder's lock held (the upcycle checkpoints' and the gates' pattern)."""
    import fcntl
    import os

    from workbench.io import lock_for
    from workbench.recipes import build, parse_recipe
    from workbench.train import trainer

    add_two_experts(pool, tiny_dir)
    seen = []

    def probe(*args, **kwargs):
        ck = kwargs["checkpoint"].path  # <smora-train>/<key>.checkpoint.safetensors
        lock = lock_for(ck.parent / ck.name[: -len(".checkpoint.safetensors")])
        if not lock.exists():
            seen.append("no lock")
        else:
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                seen.append("held")
            finally:
                os.close(fd)
        raise RuntimeError("stop here")

    monkeypatch.setattr(trainer, "train_loop", probe)
    with pytest.raises(RuntimeError, match="stop here"):
        build(parse_recipe({"name": "s", "pool": "demo", "method": "smora", "experts": ["addition", "sorting"],
                            "parameters": {"rank": 8, "k": 2, "steps": 2}}), log=lambda *a: None)
    assert seen == ["held"]  # the lock was held while it trained
