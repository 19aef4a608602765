"""Twin-Merging on the routed-LoRA layer: exact reconstruction with a one-hot router at full rank, per-sample
mixing, padding invariance, generation with and without the KV cache."""

import json

import pytest
import torch

from workbench.artifacts import load_artifact
from workbench.eval import run_eval
from workbench.recipes import build, parse_recipe
from conftest import suite_data


@pytest.fixture()
def twin_pool(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    return pool


def _twin(pool, **params):
    recipe = {"name": "twin-t", "pool": str(pool.root), "method": "twin", "experts": ["a", "b"],
              "parameters": {"router_examples": 64, "router_epochs": 5, **params}}
    return build(parse_recipe(recipe), log=lambda *a: None)


def _expert_logits(pool, name, x):
    pm = pool.peft_model([name])
    with torch.no_grad():
        return pm(input_ids=x).logits


def _force(router, i: int) -> None:
    """Make the router's MLP pick expert i for every input: softmax of a 1e4 margin is exactly one-hot in fp32."""
    last = router.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.nn.functional.one_hot(torch.tensor(i), last.out_features).float() * 1e4)


def _left_padded(rows: list[list[int]], pad: int = 0):
    """(input_ids, attention_mask, position_ids) of a left-padded batch, as HF generate and lm-eval build them."""
    n = max(map(len, rows))
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_one_hot_full_rank_reproduces_each_expert(twin_pool):
    """Forced to one expert at full rank, Twin on the routed layer is that expert's PEFT model: forward and generate."""
    art = _twin(twin_pool, rank=64, shared_lambda=0.4)
    twin = load_artifact(art).model
    router = twin.twin.router
    x = torch.randint(5, 90, (2, 11), generator=torch.Generator().manual_seed(0))  # not the suite's RNG state
    for t, name in enumerate(["a", "b"]):
        _force(router, t)
        pm = twin_pool.peft_model([name])
        with torch.no_grad():
            got = twin(input_ids=x).logits
            gen = twin.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                                return_dict_in_generate=True)
            want = pm.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                               return_dict_in_generate=True)
        # the full-rank SVD parts refold the expert's delta with fp32 rounding: 1e-5 abs + 1e-5 rel (logits ~ 1)
        torch.testing.assert_close(got, _expert_logits(twin_pool, name, x), rtol=1e-5, atol=1e-5)
        assert torch.equal(gen.sequences, want.sequences)
        # decode steps stack the fp32 error of folding W0 + delta_s + e_t (1.2e-5 seen): 1e-4 as before
        torch.testing.assert_close(torch.stack(gen.scores), torch.stack(want.scores), rtol=0, atol=1e-4)
    # per sample inside one batch: row 0 routed to a, row 1 to b (each token gets its own pairs)
    router.token_weights = lambda f: torch.eye(2)[:, None, :].expand(2, f.shape[1], 2)
    with torch.no_grad():
        mixed = twin(input_ids=x).logits
    torch.testing.assert_close(mixed[0], _expert_logits(twin_pool, "a", x[:1])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], _expert_logits(twin_pool, "b", x[1:])[0], rtol=0, atol=1e-5)


def test_low_rank_is_lossy_and_router_trained(twin_pool, tmp_path):
    from workbench.tasks.suite import load_split

    art = _twin(twin_pool, rank=1)
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["type"] == "twin" and meta["rank"] == 1
    loaded = load_artifact(art)
    twin, tok = loaded.model, loaded.tokenizer
    # the router separates the tasks on held-out (validation) questions, routed through the model itself:
    # the weights a forward uses at a question's last token
    right = total = 0
    for t, task in enumerate(["addition", "sorting"]):
        for row in load_split(task, "validation")[:40]:
            ids = tok(row["question"], return_tensors="pt", add_special_tokens=False)["input_ids"]
            right += int(twin.twin.weights(ids)[0, -1].argmax().item() == t)
            total += 1
    assert right / total >= 0.9, f"router accuracy {right}/{total} on held-out questions (chance: 0.5)"
    assert meta["router"]["validation_accuracy"] >= 0.9
    # low rank: forced to expert a it is not a's PEFT model
    _force(twin.twin.router, 0)
    x = torch.randint(5, 90, (1, 7))
    with torch.no_grad():
        diff = (twin(input_ids=x).logits - _expert_logits(twin_pool, "a", x)).abs().max().item()
    assert diff > 1e-4
    # routed (router, not forced) generation through lm-eval's HFLM
    m = run_eval(str(art), ["addition", "sorting"], pool=twin_pool, limit=3, batch_size=4, out_dir=tmp_path / "lm")
    assert m["method"] == "twin" and set(m["scores"]) == {"addition", "sorting"}


@pytest.fixture()
def routed_twin(twin_pool):
    """A trained rank-1 Twin, loaded, with two prompts of different lengths that it routes softly."""
    art = _twin(twin_pool, rank=1)
    loaded = load_artifact(art)
    short, long = (loaded.tokenizer(q, add_special_tokens=False)["input_ids"]
                   for q in ("Sort: 3 1\nAnswer:", "Add: 12+30 and 7+5\nAnswer:"))
    return loaded.model, short, long


def test_padding_never_changes_a_real_tokens_logits(routed_twin):
    """A sequence's logits alone == in a right-padded batch without a mask (lm-eval's loglikelihood call) or
    with one == in a left-padded batch with its mask and positions (generate)."""
    twin, short, long = routed_twin
    n, pad = len(short), len(long) - len(short)
    assert pad > 0
    with torch.no_grad():
        alone = twin(input_ids=torch.tensor([short])).logits[0]
        batch = torch.tensor([short + [0] * pad, long])
        right = twin(batch).logits[0, :n]  # lm-eval's call: positional ids, no mask
        masked = twin(input_ids=batch, attention_mask=(batch != 0).long()).logits[0, :n]
        ids, mask, pos = _left_padded([short, long])
        left = twin(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0, pad:]
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)


def test_routing_is_soft_and_matters(routed_twin):
    """The padding tests above compare logits that routing moves: weights are soft and change the output."""
    twin, short, _ = routed_twin
    ids = torch.tensor([short])
    w = twin.twin.weights(ids)
    assert w.shape == (1, len(short), 2) and w.min() > 0.01
    with torch.no_grad():
        routed = twin(input_ids=ids).logits
        with twin.routing.use():  # no pairs: the shared model
            shared = twin(input_ids=ids).logits
    assert (routed - shared).abs().max() > 1e-3


def test_generate_with_cache_equals_without(routed_twin):
    """Routing per new token at decode: the KV-cached pre-pass and running sums give what full forwards give."""
    twin, short, long = routed_twin
    ids, mask, _ = _left_padded([short, long])
    out = {}
    with torch.no_grad():
        for cache in (True, False):
            out[cache] = twin.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                       use_cache=cache, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out[True].sequences, out[False].sequences)
    torch.testing.assert_close(torch.stack(out[True].scores), torch.stack(out[False].scores), rtol=0, atol=1e-5)


def test_manual_decode_continues_its_own_cache(routed_twin):
    """A cache returned by a plain forward continues (routing state tied to it); a foreign cache is refused."""
    from transformers import DynamicCache

    from workbench.errors import WorkbenchError

    twin, _, long = routed_twin
    ids = torch.tensor([long])
    with torch.no_grad():
        full = twin(input_ids=ids).logits[0, -1]
        first = twin(input_ids=ids[:, :-1])
        step = twin(input_ids=ids[:, -1:], cache=first.cache).logits[0, -1]
        torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
        foreign = DynamicCache(config=twin.config)
        with twin.routing.use():  # filled by the decoder alone, not through the model's forward
            twin.base_model(input_ids=ids[:, :-1], cache=foreign, use_cache=True)
        with pytest.raises(WorkbenchError, match="not filled by this model's own forwards"):
            twin(input_ids=ids[:, -1:], cache=foreign)


def test_first_generated_token_routes_like_the_prompt_mean(routed_twin):
    """generate_until (left-padded prompts with a mask): the first new token's routing is the reference's
    prompt-level routing, softmax(router(mean over the prompt's tokens of the shared model's last hidden state))."""
    twin, short, long = routed_twin
    router = twin.twin.router
    ids, mask, _ = _left_padded([short, long])
    seen = []
    real = router.token_weights
    router.token_weights = lambda f: seen.append(real(f)) or seen[-1]
    with torch.no_grad():
        twin.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
        with twin.routing.use():  # the mean-pooled route of the previous (per-input) Twin
            h = twin(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    m = mask[..., None].float()
    prompt_level = real((h * m).sum(1) / m.sum(1))
    assert seen[0].shape == (2, ids.shape[1], 2)
    torch.testing.assert_close(seen[0][:, -1], prompt_level, rtol=0, atol=1e-5)


def test_twin_router_is_a_saved_router(routed_twin, twin_pool, tmp_path):
    """The router is registered (load_router reads it back) and a trace shows Twin's per-token weights."""
    from workbench.methods.routing import trace_prompt
    from workbench.modules.routers import ROUTERS, load_router

    twin, short, _ = routed_twin
    router = twin.twin.router
    assert ROUTERS.get("twin") is type(router)
    router.save(tmp_path / "r")
    again = load_router(tmp_path / "r")
    f = torch.randn(3, router.d_in)
    torch.testing.assert_close(again.token_weights(f), router.token_weights(f))
    tok = twin_pool.base.tokenizer()
    tr = trace_prompt(twin, tok, "Sort: 3 1\nAnswer:")
    w = twin.twin.weights(torch.tensor([short]))[0]
    torch.testing.assert_close(torch.tensor(tr["choices"])[:, 0], w, rtol=0, atol=1e-4)


def test_twin_needs_tasks(pool, tiny_dir):
    from workbench.errors import RecipeError

    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    with pytest.raises(RecipeError, match=r"twin: expert 'a' of pool 'demo' has no recorded training data .*: attach it with `workbench pool data demo a --data FILE`"):
        parse_recipe({"name": "t", "pool": str(pool.root), "method": "twin", "experts": ["a", "b"]})


def test_multitask_expert_routes_all_its_tasks(pool, tiny_dir, monkeypatch):
    """A multi-task expert's router examples come from every task it was trained on, in equal shares."""
    from workbench.methods import twin as twin_mod
    from workbench.tasks.suite import load_split

    pool.add(tiny_dir / "lora_a", "m", tags={"task": "multitask"}, data=suite_data("addition", "sorting"))
    pool.add(tiny_dir / "lora_b", "w", tags={"task": "word_count"}, data=suite_data("word_count"))
    seen: dict[str, list[str]] = {}
    real = twin_mod.pooled_features

    def recording(model, tok, texts, batch_size=32, desc=""):
        seen[desc] = list(texts)
        return real(model, tok, texts, batch_size, desc)

    monkeypatch.setattr(twin_mod, "pooled_features", recording)
    recipe = {"name": "twin-mt", "pool": str(pool.root), "method": "twin", "experts": ["m", "w"],
              "parameters": {"router_examples": 40, "router_epochs": 1, "rank": 2}}
    build(parse_recipe(recipe), force=True, log=lambda *a: None)
    rows = seen["router features m"]
    train = {t: {r["question"] for r in load_split(t, "train")} for t in ("addition", "sorting")}
    assert len(rows) == 40
    assert sum(q in train["addition"] for q in rows) == 20 and sum(q in train["sorting"] for q in rows) == 20
    assert set(seen["router features w"]) <= {r["question"] for r in load_split("word_count", "train")}


@pytest.mark.parametrize(("tasks", "shared"), [
    (("addition",), "addition"),
    (("word_count", "sorting"), "sorting"),
])
def test_twin_refuses_two_experts_of_one_task(pool, tiny_dir, tasks, shared):
    """Two experts trained on one dataset would give the router conflicting labels: refused, naming both."""
    from workbench.errors import RecipeError

    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    pool.add(tiny_dir / "lora_b", "c", data=suite_data(*tasks))
    other = "a" if shared == "addition" else "b"
    with pytest.raises(RecipeError, match=rf"experts '{other}' and 'c' were both trained on suite:{shared};"):
        parse_recipe({"name": "t", "pool": str(pool.root), "method": "twin", "experts": ["a", "b", "c"]})


def test_key_inputs_hash_the_router_data(twin_pool, tmp_path):
    """The artifact key covers the data the router reads: data recorded anew (another content hash) rebuilds Twin."""
    from workbench.methods import twin as twin_mod

    experts = [twin_pool.expert("a"), twin_pool.expert("b")]
    params = twin_mod.TwinParams()
    assert twin_mod.Twin.version == 1
    before = twin_mod.Twin().key_inputs(experts, params)
    assert before == {"data": {"a": [suite_data("addition")[0].identity], "b": [suite_data("sorting")[0].identity]}}
    recipe = {"name": "t", "pool": str(twin_pool.root), "method": "twin", "experts": ["a", "b"]}
    key = parse_recipe(recipe).key
    f = tmp_path / "sorting.jsonl"
    f.write_text('{"question": "Sort: 2 1\\nAnswer:", "answer": "1 2"}\n')
    from workbench.api import attach_data

    attach_data(twin_pool, "b", str(f))
    after = twin_mod.Twin().key_inputs([twin_pool.expert("a"), twin_pool.expert("b")], params)
    assert after["data"]["a"] == before["data"]["a"] and after["data"]["b"] != before["data"]["b"]
    assert parse_recipe(recipe).key != key
