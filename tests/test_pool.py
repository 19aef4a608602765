"""Pools: round trip of task vectors, PEFT loading, and every bad input of the Foundation issue."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import snapshot, suite_data
from safetensors.torch import load_file, save_file

from workbench.errors import BaseModelError, ExpertValidationError, ManifestError, PoolError
from workbench.pool import Pool
from workbench.testing import make_tiny_base, make_tiny_lora


def _lora_delta_by_hand(folder, module, scale):
    sd = load_file(folder / "adapter_model.safetensors")
    a = sd[f"base_model.model.{module}.lora_A.weight"]
    b = sd[f"base_model.model.{module}.lora_B.weight"]
    return scale * (b @ a)


def test_round_trip_two_lora_one_full(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "lora_a", tags={"task": "x"})
    pool.add(tiny_dir / "lora_b", "lora_b")
    pool.add(tiny_dir / "full_c", "full_c")
    reopened = Pool.open(pool.root)
    assert reopened.names() == ["lora_a", "lora_b", "full_c"]
    assert reopened.expert("lora_a").entry.tags == {"task": "x"}

    a = reopened.expert("lora_a")
    assert len(a.delta_names()) == 2 * 3  # 2 layers x (q, v, down)
    for name in a.delta_names():
        module = name[: -len(".weight")]
        torch.testing.assert_close(a.delta(name), _lora_delta_by_hand(tiny_dir / "lora_a", module, 8 / 4), rtol=0, atol=0)
    b = reopened.expert("lora_b")
    for name in b.delta_names():
        torch.testing.assert_close(b.delta(name), _lora_delta_by_hand(tiny_dir / "lora_b", name[:-7], 4 / 2), rtol=0, atol=0)

    c = reopened.expert("full_c")
    base_sd = load_file(tiny_dir / "base" / "model.safetensors")
    full_sd = load_file(tiny_dir / "full_c" / "model.safetensors")
    assert set(c.delta_names()) == set(base_sd)
    for name in c.delta_names():
        torch.testing.assert_close(c.delta(name), full_sd[name] - base_sd[name], rtol=0, atol=0)
    assert reopened.verify() == []


def test_peft_model_matches_task_vectors(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "lora_a")
    pool.add(tiny_dir / "lora_b", "lora_b")
    pm = pool.peft_model()
    assert set(pm.peft_config) == {"lora_a", "lora_b"}
    x = torch.randint(5, 90, (2, 7))
    pm.set_adapter("lora_b")
    with torch.no_grad():
        got = pm(input_ids=x).logits
    # base + task vectors of lora_b, applied by hand
    model = pool.base.load()
    sd = model.state_dict()
    expert = pool.expert("lora_b")
    with torch.no_grad():
        for name in expert.delta_names():
            sd[name] += expert.delta(name)
        model.load_state_dict(sd)
        want = model(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_remove_deletes_copied_files(pool, tiny_dir):
    e = pool.add(tiny_dir / "lora_a", "lora_a")
    assert e.path.is_dir()
    pool.remove("lora_a")
    assert not e.path.exists() and Pool.open(pool.root).names() == []


def test_link_references_in_place(pool, tiny_dir):
    e = pool.add(tiny_dir / "lora_a", "lora_a", link=True)
    assert e.path == (tiny_dir / "lora_a").resolve() and e.entry.linked
    pool.remove("lora_a")
    assert (tiny_dir / "lora_a" / "adapter_model.safetensors").is_file()  # linked files are never deleted


# ----------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _expect_unchanged(pool, fn, exc, match):
    before = snapshot(pool.root)
    with pytest.raises(exc, match=match):
        fn()
    assert snapshot(pool.root) == before
    return before


def test_unknown_base_alias(pools):
    with pytest.raises(BaseModelError, match=r"unknown base model 'smollm2-13m'.*did you mean 'smollm2-135m'"):
        Pool.create("p", base="smollm2-13m")
    assert not (pools / "p").exists()


def test_adapter_from_another_base(pool, tiny_dir, tmp_path):
    make_tiny_base(tmp_path / "other", hidden_size=32, intermediate_size=64)
    make_tiny_lora(tmp_path / "other", tmp_path / "foreign")
    _expect_unchanged(pool, lambda: pool.add(tmp_path / "foreign", "foreign"), ExpertValidationError,
                      r"shape mismatch at 'model\.layers\.0\..*another base")


def test_full_model_from_another_base(pool, tmp_path):
    make_tiny_base(tmp_path / "other", intermediate_size=96)
    _expect_unchanged(pool, lambda: pool.add(tmp_path / "other", "other"), ExpertValidationError,
                      r"shape mismatch at .*mlp.*another base")


def test_lora_targets_missing_module(pool, tiny_dir, tmp_path):
    src = _copy(tiny_dir / "lora_a", tmp_path / "bad")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_unchanged(pool, lambda: pool.add(src, "bad"), ExpertValidationError,
                      r"target modules \['c_attn'\] do not exist in the base")


def test_lora_weights_for_missing_module(pool, tiny_dir, tmp_path):
    src = _copy(tiny_dir / "lora_a", tmp_path / "bad")
    sd = load_file(src / "adapter_model.safetensors")
    sd = {k.replace("self_attn.q_proj", "self_attn.c_attn"): v for k, v in sd.items()}
    save_file(sd, src / "adapter_model.safetensors")
    _expect_unchanged(pool, lambda: pool.add(src, "bad"), ExpertValidationError,
                      r"targets module 'model\.layers\.0\.self_attn\.c_attn', which does not exist")


def test_missing_safetensors(pool, tiny_dir, tmp_path):
    src = _copy(tiny_dir / "lora_a", tmp_path / "bad")
    (src / "adapter_model.safetensors").unlink()
    _expect_unchanged(pool, lambda: pool.add(src, "bad"), ExpertValidationError, r"missing .*adapter_model\.safetensors")


def test_truncated_safetensors(pool, tiny_dir, tmp_path):
    src = _copy(tiny_dir / "lora_a", tmp_path / "bad")
    f = src / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_unchanged(pool, lambda: pool.add(src, "bad"), ExpertValidationError, r"truncated or corrupt")


@pytest.mark.parametrize("fname", ["adapter_model.bin", "weights.pt"])
def test_pickle_weights_refused_never_unpickled(pool, tiny_dir, tmp_path, monkeypatch, fname):
    src = _copy(tiny_dir / "lora_a", tmp_path / "bad")
    (src / "adapter_model.safetensors").unlink()
    torch.save(load_file(tiny_dir / "lora_a" / "adapter_model.safetensors"), src / fname)

    def boom(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    _expect_unchanged(pool, lambda: pool.add(src, "bad"), ExpertValidationError,
                      rf"holds pickle-format weights \({fname}\).*never loaded")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(pool, tiny_dir, tmp_path, value):
    src = _copy(tiny_dir / "lora_a", tmp_path / "bad")
    sd = load_file(src / "adapter_model.safetensors")
    key = sorted(k for k in sd if "lora_B" in k)[0]
    sd[key][0, 0] = value
    save_file(sd, src / "adapter_model.safetensors")
    _expect_unchanged(pool, lambda: pool.add(src, "bad"), ExpertValidationError, r"NaN or Inf values in tensor")


def test_duplicate_expert_name(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "dup")
    _expect_unchanged(pool, lambda: pool.add(tiny_dir / "lora_b", "dup"), PoolError, r"already has an expert named 'dup'")


@pytest.mark.parametrize("name", ["a/b", "..", "../escape", "a..b", "/abs", ".hidden", "", "x" * 65, "sp ace",
                                  "trail\n"])
def test_path_tricks_in_names(pool, tiny_dir, name):
    _expect_unchanged(pool, lambda: pool.add(tiny_dir / "lora_a", name), PoolError, r"invalid expert name")


def test_hand_edited_invalid_manifest(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "lora_a")
    path = pool.root / "pool.json"
    broken = path.read_text().replace('"kind": "lora",', '"kind": "lora"', 1)
    path.write_text(broken)
    before = snapshot(pool.root)
    with pytest.raises(ManifestError, match=r"pool\.json is not valid JSON \(line \d+, column \d+"):
        Pool.open(pool.root)
    assert snapshot(pool.root) == before and path.read_text() == broken


def test_manifest_schema_violation(pool):
    path = pool.root / "pool.json"
    data = json.loads(path.read_text())
    data["experts"] = [{"name": "x", "kind": "adapter", "path": "experts/x"}]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"not a valid pool manifest: experts\.0\.kind"):
        Pool.open(pool.root)


def test_crash_mid_add_leaves_manifest_consistent(pool, tiny_dir, monkeypatch):
    pool.add(tiny_dir / "lora_b", "keep")
    before_manifest = (pool.root / "pool.json").read_bytes()
    calls = {"n": 0}
    real_copy = shutil.copy2

    def flaky_copy(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash mid-copy")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copy2", flaky_copy)
    with pytest.raises(KeyboardInterrupt):
        pool.add(tiny_dir / "lora_a", "half")
    assert (pool.root / "pool.json").read_bytes() == before_manifest
    assert not (pool.root / "experts" / "half").exists()
    assert list((pool.root / ".staging").iterdir()) == []
    monkeypatch.setattr(shutil, "copy2", real_copy)
    assert Pool.open(pool.root).verify() == []
    pool.add(tiny_dir / "lora_a", "half")  # rerun after the crash succeeds
    assert Pool.open(pool.root).names() == ["keep", "half"]


def test_verify_reports_tampering(pool, tiny_dir):
    e = pool.add(tiny_dir / "lora_a", "lora_a")
    sd = load_file(e.path / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in sd.items()}, e.path / "adapter_model.safetensors")
    (pool.root / "experts" / "stray").mkdir()
    problems = pool.verify()
    assert any("sha256 mismatch" in p for p in problems)
    assert any("orphan folder" in p and "stray" in p for p in problems)


def test_files_present(pool, tiny_dir):
    e = pool.add(tiny_dir / "lora_a", "a")
    assert e.files_present()
    shutil.rmtree(e.path)  # a fresh clone: manifest committed, weights not
    assert not Pool.open(pool.root).expert("a").files_present()


def test_unknown_expert_suggests(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "addition")
    with pytest.raises(PoolError, match=r"no expert 'additon' \(did you mean 'addition'\?\)"):
        pool.expert("additon")


# ----------------------------------------------------------------------------- adapters made by PEFT itself


def _peft_lora(base_dir, folder, seed=5, **lora_kwargs):
    """A PEFT LoRA folder made by PEFT from `LoraConfig(**lora_kwargs)`, with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs)
    get_peft_model(model, cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _peft_deltas(base_dir, folder):
    """PEFT's own delta of every LoRA module (`get_delta_weight`), keyed by the base tensor name."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), folder)
    with torch.no_grad():
        return {name.removeprefix("base_model.model.") + ".weight": m.get_delta_weight("default")
                for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _assert_deltas_match_peft(expert, base_dir, folder):
    want = _peft_deltas(base_dir, folder)
    assert sorted(expert.delta_names()) == sorted(want)
    for name, delta in want.items():
        torch.testing.assert_close(expert.delta(name), delta, rtol=1e-6, atol=1e-7)


def test_all_linear_adapter_made_by_peft(pool, tiny_dir, tmp_path):
    # PEFT saves "all-linear" as the full names of the modules it matched (model.layers.0.mlp.up_proj, ...)
    src = _peft_lora(tiny_dir / "base", tmp_path / "all", r=4, lora_alpha=8, target_modules="all-linear")
    assert "model.layers.0.mlp.up_proj" in json.loads((src / "adapter_config.json").read_text())["target_modules"]
    e = pool.add(src, "all")
    assert len(e.delta_names()) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    _assert_deltas_match_peft(e, tiny_dir / "base", src)


def test_rslora_scale_matches_peft(pool, tiny_dir, tmp_path):
    src = _peft_lora(tiny_dir / "base", tmp_path / "rs", r=4, lora_alpha=8, use_rslora=True,
                     target_modules=["q_proj", "down_proj"])
    e = pool.add(src, "rs")
    assert e.entry.lora.use_rslora
    name = e.delta_names()[0]
    torch.testing.assert_close(e.delta(name), _lora_delta_by_hand(src, name[:-7], 8 / 4 ** 0.5), rtol=1e-6, atol=0)
    _assert_deltas_match_peft(e, tiny_dir / "base", src)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_match_peft(pool, tiny_dir, tmp_path, use_rslora):
    src = _peft_lora(tiny_dir / "base", tmp_path / "pat", r=4, lora_alpha=8, use_rslora=use_rslora,
                     target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                     alpha_pattern={"q_proj": 3, "down_proj": 20})
    e = pool.add(src, "pat")
    ranks = {n: e.lora_factors(n)[0].shape[0] for n in e.delta_names()}
    assert ranks["model.layers.0.self_attn.v_proj.weight"] == 2 and ranks["model.layers.1.mlp.down_proj.weight"] == 6
    assert ranks["model.layers.0.mlp.down_proj.weight"] == 4
    _assert_deltas_match_peft(e, tiny_dir / "base", src)


def _edit_config(src, **changes):
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(changes)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    return src


def test_config_rank_differs_from_tensors(pool, tiny_dir, tmp_path):
    src = _edit_config(_copy(tiny_dir / "lora_a", tmp_path / "bad"), r=16)  # tensors are rank 4
    _expect_unchanged(pool, lambda: pool.add(src, "bad"), ExpertValidationError,
                      r"module 'model\.layers\.0\.mlp\.down_proj' has rank-4 LoRA tensors but adapter_config\.json "
                      r"gives it r=16$")


def test_rank_pattern_differs_from_tensors(pool, tiny_dir, tmp_path):
    src = _edit_config(_copy(tiny_dir / "lora_a", tmp_path / "bad"), rank_pattern={"v_proj": 2})
    _expect_unchanged(pool, lambda: pool.add(src, "bad"), ExpertValidationError,
                      r"module 'model\.layers\.0\.self_attn\.v_proj' has rank-4 LoRA tensors "
                      r"but .* r=2 \(rank_pattern\)")


# ----------------------------------------------------------------------------- names, links, missing files


def test_name_with_trailing_newline(pools, pool, tiny_dir):
    _expect_unchanged(pool, lambda: pool.add(tiny_dir / "lora_a", "trail\n"), PoolError, r"invalid expert name")
    with pytest.raises(PoolError, match=r"invalid pool name"):
        Pool.create("trail\n", base=str(tiny_dir / "base"))
    assert sorted(p.name for p in pools.iterdir()) == ["demo"]


def test_name_with_trailing_newline_cli(run_cli, pools, tiny_dir):
    assert run_cli("pool", "create", "demo", "--base", str(tiny_dir / "base"))[0] == 0
    before = snapshot(pools)
    for args in [("pool", "create", "trail\n", "--base", str(tiny_dir / "base")),
                 ("pool", "add", "demo", str(tiny_dir / "lora_a"), "--name", "trail\n")]:
        code, _, err = run_cli(*args)
        assert code == 2 and err.startswith("error: invalid") and "name" in err, err
        assert snapshot(pools) == before and sorted(p.name for p in pools.iterdir()) == ["demo"]


@pytest.mark.parametrize("link", [False, True])
def test_symlink_outside_source_refused(pool, tiny_dir, tmp_path, link):
    src = _copy(tiny_dir / "lora_a", tmp_path / "src")
    (tmp_path / "secret.txt").write_text("not part of the adapter")
    (src / "README.md").unlink()  # PEFT's model card, replaced by a link
    (src / "README.md").symlink_to(tmp_path / "secret.txt")
    _expect_unchanged(pool, lambda: pool.add(src, "x", link=link), ExpertValidationError,
                      r"README\.md is a symbolic link to .*secret\.txt, outside the folder")


def test_symlink_inside_source_copied_as_file(pool, tiny_dir, tmp_path):
    src = _copy(tiny_dir / "lora_a", tmp_path / "src")
    (src / "docs").mkdir()
    (src / "docs" / "card.txt").write_text("model card")
    (src / "README.md").unlink()
    (src / "README.md").symlink_to(src / "docs" / "card.txt")
    e = pool.add(src, "x")
    copied = e.path / "README.md"
    assert not copied.is_symlink() and copied.read_text() == "model card"
    assert pool.verify() == []


def test_missing_files_shown_by_list_and_show(run_cli, pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "lora_a")
    full = pool.add(tiny_dir / "full_c", "full_c")
    shutil.rmtree(full.path)  # the folder of a full expert is gone
    status = Pool.open(pool.root).expert("full_c").status()
    assert status.startswith("missing files: ") and "config.json" in status
    code, out, err = run_cli("pool", "list", "demo")
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if "lora_a" in line or "full_c" in line}
    assert "missing files" in rows["full_c"] and "ok" in rows["lora_a"] and "missing" not in rows["lora_a"]
    code, out, _ = run_cli("pool", "show", "demo", "full_c")
    assert json.loads(out)["status"].startswith("missing files: ") and "model.safetensors" in json.loads(out)["status"]
    code, out, _ = run_cli("pool", "show", "demo", "--json")
    assert [e["status"][:13] for e in json.loads(out)["experts"]] == ["ok", "missing files"]
    code, out, _ = run_cli("pool", "list")
    assert [line.split()[-2] for line in out.splitlines() if " demo " in line] == ["1"]


# ----------------------------------------------------------------------------- base identity


def test_full_expert_from_another_base_refused(run_cli, pool, tiny_dir, tmp_path):
    from workbench.testing import make_tiny_full

    make_tiny_base(tmp_path / "other", seed=7)  # same architecture and shapes, other weights
    make_tiny_full(tmp_path / "other", tmp_path / "foreign", seed=3)
    _expect_unchanged(pool, lambda: pool.add(tmp_path / "foreign", "foreign"), ExpertValidationError,
                      r"relative delta norm to the pool's base is 1\.[234]\d\d \(> 0\.5; .*allow_distant=True")
    before = snapshot(pool.root)
    code, _, err = run_cli("pool", "add", str(pool.root), str(tmp_path / "foreign"))
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "--allow-distant-base" in err.splitlines()[-1]
    assert snapshot(pool.root) == before

    genuine = pool.add(tiny_dir / "full_c", "full_c")
    assert 0.05 < genuine.entry.base_distance < 0.2
    code, _, err = run_cli("pool", "add", str(pool.root), str(tmp_path / "foreign"), "--allow-distant-base")
    assert code == 0, err
    entries = {e["name"]: e for e in json.loads((pool.root / "pool.json").read_text())["experts"]}
    assert entries["full_c"]["base_distance"] == genuine.entry.base_distance
    assert 1.2 < entries["foreign"]["base_distance"] < 1.5
    lora = pool.add(tiny_dir / "lora_a", "lora_a")
    assert "base_distance" not in json.loads((pool.root / "pool.json").read_text())["experts"][-1]
    assert lora.entry.base_distance is None


def test_lora_base_name_compared(pool, tiny_dir, tmp_path):
    """A folder base: another existing folder is refused; a hub id or another machine's path has nothing
    here to compare with (the folder's config names no hub id), so it passes."""
    make_tiny_base(tmp_path / "other_base", seed=7)
    named = str(tmp_path / "other_base")
    src = _edit_config(_copy(tiny_dir / "lora_a", tmp_path / "bad0"), base_model_name_or_path=named)
    _expect_unchanged(pool, lambda src=src: pool.add(src, "bad"), ExpertValidationError,
                      rf"trained on base '{named}', the pool's base is '.*/base'; .*allow_distant=True")
    assert pool.add(tmp_path / "bad0", "distant", allow_distant=True).entry.lora is not None
    for i, other in enumerate(["meta-llama/Llama-2-7b-hf", "/elsewhere/outputs/base", "llama-7b"]):
        src = _edit_config(_copy(tiny_dir / "lora_a", tmp_path / f"unknown{i}"), base_model_name_or_path=other)
        pool.add(src, f"unknown{i}")
        pool.remove(f"unknown{i}")
    ok = _edit_config(_copy(tiny_dir / "lora_a", tmp_path / "ok"), base_model_name_or_path="")
    pool.add(ok, "empty")
    cfg = json.loads((ok / "adapter_config.json").read_text())
    del cfg["base_model_name_or_path"]
    (ok / "adapter_config.json").write_text(json.dumps(cfg))
    pool.add(ok, "absent")
    assert pool.names() == ["distant", "empty", "absent"]


def test_lora_base_name_of_an_alias(pools, tiny_dir, tmp_path, monkeypatch):
    # The alias's cached folder is a copy of the tiny base: no download, the alias machinery is the real one.
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_dir / "base", tmp_path / "cache" / "base" / "smollm2-135m")  # what `base fetch` caches
    pool = Pool.create("aliased", base="smollm2-135m")
    cached = tmp_path / "cache" / "base" / "smollm2-135m"
    for named in ["HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct", "smollm2-135m",
                  str(cached), "/home/someone/.cache/workbench/base/smollm2-135m"]:  # the last: another machine
        src = _edit_config(_copy(tiny_dir / "lora_a", tmp_path / "src"), base_model_name_or_path=named)
        pool.add(src, "ok", replace=True)
        shutil.rmtree(src)
    for other in ["HuggingFaceTB/SmolLM2-360M", "meta-llama/Llama-2-7b-hf"]:
        src = _edit_config(_copy(tiny_dir / "lora_a", tmp_path / "src"), base_model_name_or_path=other)
        _expect_unchanged(pool, lambda src=src: pool.add(src, "bad"), ExpertValidationError,
                          rf"trained on base '{other}', the pool's base is 'smollm2-135m'")
        shutil.rmtree(src)


# ----------------------------------------------------------------------------- demo rebuild


def test_demo_rebuild_keeps_manifest(pool, tiny_dir, monkeypatch):
    from workbench import demo

    pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"), training={"wall_s": 1.5})
    pool.add(tiny_dir / "lora_b", "sorting", training={"wall_s": 2.5})
    path = pool.root / "pool.json"
    data = json.loads(path.read_text())
    data["experts"][0]["added_at"] = "2020-01-01T00:00:00+0000"  # a committed manifest, older than this run
    path.write_text(json.dumps(data, indent=2) + "\n")
    committed = path.read_bytes()
    retrained_from = {"src": tiny_dir / "lora_a"}

    def fake_train(pool, name, tasks, cfg, *, device, replace=False):  # what train_expert does, minus training
        assert replace and [rec.name for rec, _ in tasks] == ["addition"]
        return pool.add(retrained_from["src"], name, kind="lora", tags={"task": "addition"}, data=suite_data("addition"),
                        training={"wall_s": 9.9}, replace=replace)

    monkeypatch.setattr(demo, "train_expert", fake_train)
    shutil.rmtree(pool.root / "experts" / "addition")  # a fresh clone: the manifest, not the weights
    built = demo.build_demo_pool(str(pool.root), only=["addition"], log=lambda *a: None)
    assert built.expert("addition").files_present()
    assert path.read_bytes() == committed  # same bytes retrained: the manifest is untouched

    retrained_from["src"] = tiny_dir / "lora_b"  # other bytes: only what was measured on the files changes
    shutil.rmtree(pool.root / "experts" / "addition")
    demo.build_demo_pool(str(pool.root), only=["addition"], log=lambda *a: None)
    entry = Pool.open(pool.root).manifest.experts[0]
    assert entry.name == "addition" and entry.added_at == "2020-01-01T00:00:00+0000"
    assert entry.training == {"wall_s": 1.5} and entry.lora.r == 2
    assert entry.files != data["experts"][0]["files"] and Pool.open(pool.root).verify() == []


def test_missing_lora_alpha_defaults_like_peft(pool, tiny_dir, tmp_path):
    """A config without lora_alpha: PEFT's default (8), not r, sets the scale."""
    src = _peft_lora(tiny_dir / "base", tmp_path / "noalpha", r=16, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((src / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    e = pool.add(src, "noalpha")
    _assert_deltas_match_peft(e, tiny_dir / "base", src)


def test_hf_cache_snapshot_links_accepted(pool, tiny_dir, tmp_path):
    """The Hugging Face cache's layout: snapshots/<rev>/<file> -> ../../blobs/<hash>, accepted and copied."""
    repo = tmp_path / "models--x--lora"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (tiny_dir / "lora_a").iterdir():
        (blobs / f"h-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"h-{f.name}")
    e = pool.add(snap, "cached")
    assert not any(p.is_symlink() for p in e.path.iterdir()) and e.files_present()
    (snap / "notes.md").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_text("private")
    with pytest.raises(ExpertValidationError, match="notes.md is a symbolic link"):
        pool.add(snap, "leak")


def test_sharded_index_outside_folder_refused(pool, tiny_dir, tmp_path):
    src = _copy(tiny_dir / "full_c", tmp_path / "full")
    (src / "model.safetensors").rename(tmp_path / "outside.safetensors")
    names = json.loads(json.dumps(list(__import__("safetensors").safe_open(
        str(tmp_path / "outside.safetensors"), "pt").keys())))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../outside.safetensors" for n in names}}))
    _expect_unchanged(pool, lambda: pool.add(src, "full"), ExpertValidationError,
                      r"weight_map names '../outside.safetensors', not a .safetensors file of this folder")
