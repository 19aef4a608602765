"""The embedded default as a fresh clone has it: the shipped demo LoRA experts are present, intact and half
precision; every recipe and comparison in merges/ parses against the committed pool; the quick demo plans
every LoRA row and skips only what needs the (unshipped) full fine-tunes, each with one line."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from workbench.comparison import parse_comparison
from workbench.errors import RecipeError
from workbench.pool import Pool
from workbench.recipes import parse_recipe

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("WORKBENCH_POOLS", raising=False)


def test_shipped_lora_experts_are_present_intact_and_half_precision():
    from workbench.demo import SHIPPED

    pool = Pool.open("demo")
    lora = [e for e in pool.experts if e.kind == "lora" and e.name in SHIPPED]
    assert {e.name for e in lora} == {"addition", "sorting", "unit_conversion", "word_count", "repeat_word",
                                      "reverse_words", "multitask"}
    # the rest (full fine-tunes, the rank-64 multitask LoRA) are not shipped: each says how to build it
    unshipped = [e for e in pool.experts if e.name not in SHIPPED]
    assert all(e.entry.rebuild == "workbench demo --full" for e in unshipped), [e.name for e in unshipped]
    problems = [p for p in pool.verify() if not any(p.startswith(e.name + ":") or p.startswith(e.name + " ")
                                                     for e in unshipped)]
    assert problems == []
    for e in lora:
        with safe_open(str(e.path / "adapter_model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        assert dtypes == {"F16"}, (e.name, dtypes)
        assert e.entry.training["config"]["lr"] > 0  # a real training record ships with the weights
        cfg = json.loads((e.path / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == pool.manifest.base.spec  # no machine's cache path in git
        assert "/root/" not in (e.path / "README.md").read_text() and "/home/" not in (e.path / "README.md").read_text()
    tracked = set(subprocess.run(["git", "ls-files", "adapters/demo/experts", "adapters/demo/parts"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split())
    for e in lora:  # in git, not just on this disk
        assert {f"adapters/demo/{e.entry.path}/{f}" for f in e.entry.files} <= tracked, e.name


def test_half_lora_loads_as_fp32():
    pool = Pool.open("demo")
    a, b, _ = pool.expert("addition").lora_factors(pool.expert("addition").delta_names()[0])
    assert a.dtype == b.dtype == torch.float32


def test_every_recipe_and_comparison_in_merges_parses():
    for f in sorted((ROOT / "merges").glob("*.yaml")):
        data = yaml.safe_load(f.read_text())
        if "entries" in data:
            try:
                c = parse_comparison(f)
            except RecipeError as e:
                # a pool whose weights are not shipped (demo-old): one line saying how to get them
                assert "every row is skipped" in str(e) and "trains them" in str(e), (f, e)
                continue
            assert len(c.rows) >= len(data["entries"]), f
        else:
            parse_recipe(data, source=str(f), require_files=False)


def test_quick_demo_skips_only_full_finetune_rows(monkeypatch):
    from workbench.pool import Expert

    real = Expert.files_present
    # as on a fresh clone, whatever this machine has trained: the full fine-tunes are absent, the LoRAs ship
    monkeypatch.setattr(Expert, "files_present", lambda self: real(self) and self.kind != "full")
    c = parse_comparison(ROOT / "merges" / "demo.yaml")
    pool = Pool.open("demo")
    assert any(e.kind == "full" for e in pool.experts)
    full_absent = {e.name for e in pool.experts if e.kind == "full" and not e.files_present()}
    skipped = {r.name: r.skip for r in c.rows if r.skip}
    needs_full = {r.name for r in c.rows if r.kind == "expert" and r.expert in full_absent} | \
        {r.name for r in c.rows if r.recipe is not None and {e.name for e in r.recipe.experts} & full_absent}
    assert set(skipped) == needs_full and {"ties-full", "full-addition"} <= set(skipped)
    assert all("`workbench demo --full` trains" in s for s in skipped.values())
    active = {r.name for r in c.active_rows}
    assert {"base", "multitask", "ta", "ties", "pcb", "twin", "phatgoose", "arrow", "avg-act"} <= active
    assert c.reference == "multitask"


def test_every_shipped_gate_is_the_one_head_computes():
    """The PHATGOOSE gates shipped in adapters/demo/parts/ are exactly those the quick demo's phatgoose rows look for
    (key: gate settings, the expert's file hashes, base, data): a stale one (trained before its expert's files
    changed) would be ignored and its gate silently retrained by `workbench demo`."""
    from workbench.methods.base import BuildContext

    c = parse_comparison(ROOT / "merges" / "demo.yaml")
    wanted = set()
    for row in c.active_rows:
        if row.method == "phatgoose":
            r = row.recipe
            ctx = BuildContext(pool=c.pool, experts=r.experts, params=r.params, output=r.recipe.output,
                               out_dir=r.artifact_dir)
            wanted |= {r.method._gate_dir(ctx, e).name for e in r.experts}
    parts = c.pool.root / "parts" / "phatgoose-gates"
    shipped = {p.name for p in parts.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert len(wanted) == 6 and shipped == wanted, (sorted(shipped - wanted), sorted(wanted - shipped))
