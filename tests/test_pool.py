"""Pools: round trip of task vectors, PEFT loading, and every bad input of the Foundation issue."""

import json
import pickle
import shutil

import pytest
import torch
from conftest import snapshot
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


@pytest.mark.parametrize("name", ["a/b", "..", "../escape", "a..b", "/abs", ".hidden", "", "x" * 65, "sp ace"])
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
