"""Twin-Merging: exact reconstruction with a one-hot router at full rank, per-sample mixing."""

import json

import pytest
import torch

from workbench.artifacts import load_artifact
from workbench.eval import run_eval
from workbench.recipes import build, parse_recipe


@pytest.fixture()
def twin_pool(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"})
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"})
    return pool


def _twin(pool, **params):
    recipe = {"name": "twin-t", "pool": str(pool.root), "method": "twin", "experts": ["a", "b"],
              "parameters": {"router_examples": 64, "router_epochs": 5, **params}}
    return build(parse_recipe(recipe), log=lambda *a: None)


def _expert_logits(pool, name, x):
    pm = pool.peft_model([name])
    with torch.no_grad():
        return pm(input_ids=x).logits


def test_one_hot_full_rank_reproduces_each_expert(twin_pool):
    art = _twin(twin_pool, rank=64, shared_lambda=0.4)
    twin = load_artifact(art).model
    x = torch.randint(5, 90, (2, 11))
    for t, name in enumerate(["a", "b"]):
        twin.forced_weights = torch.nn.functional.one_hot(torch.tensor(t), 2).float()
        with torch.no_grad():
            got = twin(input_ids=x).logits
        torch.testing.assert_close(got, _expert_logits(twin_pool, name, x), rtol=1e-4, atol=1e-4)
    # per sample inside one batch: row 0 routed to a, row 1 to b
    twin.forced_weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        mixed = twin(input_ids=x).logits
    torch.testing.assert_close(mixed[0], _expert_logits(twin_pool, "a", x[:1])[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], _expert_logits(twin_pool, "b", x[1:])[0], rtol=1e-4, atol=1e-4)


def test_low_rank_is_lossy_and_router_trained(twin_pool, tmp_path):
    art = _twin(twin_pool, rank=1)
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["type"] == "twin" and meta["rank"] == 1
    assert 0.0 <= meta["router"]["validation_accuracy"] <= 1.0
    twin = load_artifact(art).model
    twin.forced_weights = torch.tensor([1.0, 0.0])
    x = torch.randint(5, 90, (1, 7))
    with torch.no_grad():
        diff = (twin(input_ids=x).logits - _expert_logits(twin_pool, "a", x)).abs().max().item()
    assert diff > 1e-4
    # routed (router, not forced) generation through lm-eval's HFLM
    twin.forced_weights = None
    m = run_eval(str(art), ["addition", "sorting"], pool=twin_pool, limit=3, batch_size=4, out_dir=tmp_path / "lm")
    assert m["method"] == "twin" and set(m["scores"]) == {"addition", "sorting"}


def test_twin_needs_tasks(pool, tiny_dir):
    from workbench.errors import RecipeError

    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    with pytest.raises(RecipeError, match=r"expert 'a' has no training task"):
        parse_recipe({"name": "t", "pool": str(pool.root), "method": "twin", "experts": ["a", "b"]})
