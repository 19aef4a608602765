"""The demo pool's shipping code on the tiny model: half precision with its check, repair of an interrupted swap,
stable PEFT files, and which experts a (resumable) --full build retrains."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from conftest import suite_data


def test_ship_half_converts_checks_and_repairs_a_stopped_swap(pool, tiny_dir):
    from workbench.demo import ship_half

    pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"))
    rep = ship_half(pool, limit=2, log=lambda *a: None)
    r = rep["experts"]["addition"]
    assert r["shipped"] == "float16" and r["scores"]["float32"].keys() == {"addition"}
    f = pool.expert("addition").path / "adapter_model.safetensors"
    assert all(t.dtype == torch.float16 for t in load_file(str(f)).values())
    assert Pool_verify(pool) == []
    # a run stopped after the file swap, before the manifest: the rerun repairs the hash
    e = pool.expert("addition")
    pool._put(e.entry.model_copy(update={"files": {**e.entry.files, f.name: "0" * 64}}))
    assert Pool_verify(pool)
    ship_half(pool, limit=2, log=lambda *a: None)
    assert Pool_verify(pool) == []


def Pool_verify(pool):
    from workbench.pool import Pool

    return Pool.open(pool.root).verify()


def test_peft_files_are_stable(tiny_dir, tmp_path):
    import shutil

    from workbench.train.trainer import _stable_peft_files

    d = tmp_path / "a"
    shutil.copytree(tiny_dir / "lora_a", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["v_proj", "q_proj", "down_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "README.md").write_text("---\nbase_model: /home/me/.cache/base\ntags:\n- base_model:adapter:/home/me/.cache/base\n"
                                 "---\nmodel at /home/me/.cache/base is described here\n")
    _stable_peft_files(d, "smollm2-135m")
    first = {p.name: p.read_bytes() for p in d.iterdir()}
    assert json.loads(first["adapter_config.json"])["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    card = first["README.md"].decode()
    assert "base_model: smollm2-135m\n" in card and "- base_model:adapter:smollm2-135m\n" in card
    assert "model at /home/me/.cache/base is described" in card  # prose is left alone
    cfg["target_modules"] = ["q_proj", "down_proj", "v_proj"]  # another order, same set: same bytes
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _stable_peft_files(d, "smollm2-135m")
    assert (d / "adapter_config.json").read_bytes() == first["adapter_config.json"]


def test_full_build_retrains_only_missing_or_changed_experts(pool, tiny_dir, monkeypatch):
    from workbench import demo
    from workbench.train import LoraConfigModel

    trained = []
    monkeypatch.setattr(demo, "train_expert", lambda p, name, tasks, cfg, **k: trained.append(name))
    same = LoraConfigModel(steps=3)
    pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"),
             training={"config": same.model_dump(mode="json")})
    pool.add(tiny_dir / "lora_b", "sorting", tags={"task": "sorting"}, data=suite_data("sorting"),
             training={"config": LoraConfigModel(steps=4).model_dump(mode="json")})
    plans = [demo.ExpertPlan("addition", ("addition",), same), demo.ExpertPlan("sorting", ("sorting",), same),
             demo.ExpertPlan("word_count", ("word_count",), same)]
    logs = []
    demo.build_demo_pool(str(pool.root), plans=plans, log=logs.append)  # plain build: only what is missing
    assert trained == ["word_count"]
    assert any("sorting" in m and "another config" in m for m in logs)
    trained.clear()
    demo.build_demo_pool(str(pool.root), plans=plans, changed=True, log=lambda *a: None)  # --full: changed too
    assert trained == ["sorting", "word_count"]
    trained.clear()
    demo.build_demo_pool(str(pool.root), plans=plans, force=True, log=lambda *a: None)  # --full --retrain: all
    assert trained == ["addition", "sorting", "word_count"]
