"""Results users can trust: every number a recipe, comparison or training config takes is finite and bounded;
training never caches weights that are not finite; `experts: []` is refused; duplicate YAML keys are refused;
a comparison reads recipes from its own folder and the project's merges/ only; errors echo little of the input.
Every bad input fails in one line and writes nothing."""

import tracemalloc

import pytest
import torch
import yaml
from conftest import one_line, quiet, snapshot, suite_data
from pydantic import BaseModel, ValidationError

from workbench.errors import RecipeError, WorkbenchError

INF, NAN = float("inf"), float("nan")


@pytest.fixture()
def two(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    return pool


# ----------------------------------------------------------------------------- 1. no NaN model is ever cached


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                        max_position_embeddings=64, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).float()


def test_train_moe_refuses_weights_not_finite_after_the_last_step(tmp_path):
    """lr = inf, one step: the loss checked before the update is finite, the weights after it are not. The trainer
    says so in one line instead of returning a model whose parameters are inf/NaN."""
    from workbench.methods.upcycle import UpcycleParams, train_moe

    model = _tiny_mixtral()
    data = [([1, 5, 7, 9, 2], [-100, -100, 7, 9, 2]), ([1, 4, 6, 2], [-100, -100, 6, 2])]
    p = UpcycleParams.model_construct(lr=INF, steps=1, warmup=0, batch_size=2, checkpoint_every=20)
    with pytest.raises(WorkbenchError, match=r"^moe: \d+ of \d+ trained parameters are not finite \(inf or NaN\) "
                                             r"after the last step \(0\), e\.g\. \S+: lower the learning rate") as e:
        train_moe(model, data, 0, p, tmp_path / "ckpt", "moe", log=quiet)
    one_line(e)
    assert not (tmp_path / "ckpt").exists()


def test_train_loop_refuses_weights_not_finite_after_the_last_step(pool):
    """The expert trainer (also MoLE's and SMoRA's loop): the same check after its last step."""
    from workbench.train.trainer import FullConfig, train_loop

    model = pool.base.load()
    tok = pool.base.tokenizer()
    rows = [{"question": "12+30=", "answer": "42"}, {"question": "sort 3 1 2", "answer": "1 2 3"}]
    cfg = FullConfig.model_construct(lr=INF, steps=1, warmup=0, batch_size=2)
    with pytest.raises(WorkbenchError, match=r"^train: \d+ of \d+ trained parameters are not finite .* after the "
                                             r"last step \(0\), e\.g\. model\.\S+: lower the learning rate") as e:
        train_loop(model, tok, rows, cfg, model.parameters(), "train")
    one_line(e)


def _build_with(recipe: dict, **unchecked):
    """Build `recipe` with parameters that bypass validation (what a diverging run produces, whatever its lr)."""
    from workbench.recipes import build, parse_recipe

    resolved = parse_recipe(recipe)
    resolved.params = type(resolved.params).model_construct(**{**resolved.params.model_dump(), **unchecked})
    return build(resolved, log=quiet)


@pytest.mark.parametrize("method,params,bad", [
    ("phatgoose", {"k": 1, "steps": 1, "examples": 4, "batch_size": 2}, {"lr": INF}),
    ("mole", {"steps": 1, "examples": 4, "batch_size": 2, "warmup": 0}, {"lr": INF}),
    ("smora", {"rank": 4, "k": 2, "steps": 1, "batch_size": 2, "warmup": 0, "targets": ["q_proj"]}, {"lr": INF}),
    ("twin", {"router_examples": 8, "router_epochs": 1}, {"router_lr": INF}),
])
def test_trained_methods_cache_nothing_not_finite(two, arts, method, params, bad):
    """PHATGOOSE's gates, MoLE's gates, SMoRA's adapter, Twin's router: a run whose last update left weights that
    are not finite fails in one line; no artifact and no cached gates are written."""
    recipe = {"name": f"{method}-nan", "method": method, "pool": "demo", "experts": ["a", "b"], "parameters": params}
    with pytest.raises(WorkbenchError, match=r"trained parameters are not finite \(inf or NaN\)") as e:
        _build_with(recipe, **bad)
    one_line(e)
    written = [p for p in snapshot(arts) if p.endswith(("artifact.json", "gates.safetensors", ".safetensors"))]
    assert written == []


def test_upcycled_moe_is_not_cached_not_finite(pool, tiny_dir, arts):
    pool.add(tiny_dir / "full_c", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "full_c", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    recipe = {"name": "btx-nan", "method": "btx", "pool": "demo", "experts": ["a", "b"],
              "parameters": {"steps": 1, "warmup": 0, "examples": 4, "batch_size": 2, "max_length": 48}}
    with pytest.raises(WorkbenchError, match=r"^btx: MoE training: \d+ of \d+ trained parameters are not finite") as e:
        _build_with(recipe, lr=INF)
    one_line(e)
    assert not [p for p in snapshot(arts) if p.endswith(("artifact.json", "model.safetensors"))]


# ----------------------------------------------------------------------------- 2. bounds on every number


def _numbers(schema: dict, defs: dict, path: tuple = ()):
    """(path, node) of every integer and number in a JSON schema (through $ref, anyOf, items, properties and
    additionalProperties); a path step "[]" is a list item, "{}" a mapping value."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    for sub in schema.get("anyOf", []) + schema.get("oneOf", []):
        yield from _numbers(sub, defs, path)
    kind = schema.get("type")
    if kind in ("integer", "number"):
        yield path, schema
    if kind == "array" and isinstance(schema.get("items"), dict):
        yield from _numbers(schema["items"], defs, (*path, "[]"))
    if kind == "object":
        for k, sub in (schema.get("properties") or {}).items():
            yield from _numbers(sub, defs, (*path, k))
        if isinstance(schema.get("additionalProperties"), dict):
            yield from _numbers(schema["additionalProperties"], defs, (*path, "{}"))


def _document(path: tuple, value):
    """The smallest document that puts `value` at `path`."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if head == "[]":
        return [_document(rest, value)]
    if head == "{}":
        return {"x": _document(rest, value)}
    return {head: _document(rest, value)}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _schemas():
    from workbench.comparison import ComparisonSpec
    from workbench.methods import METHODS
    from workbench.recipes import Recipe
    from workbench.train.trainer import FullConfig, LoraConfigModel

    out = [(f"method {name}", METHODS.get(name).Params, {}) for name in METHODS.names()]
    out += [("Recipe (output, eval, sweep)", Recipe, {"name": "x", "method": "ties"}),
            ("ComparisonSpec (entries, eval, seeds)", ComparisonSpec, {"name": "x", "entries": ["base"]}),
            ("LoraConfigModel", LoraConfigModel, {}), ("FullConfig", FullConfig, {})]
    from workbench.methods.routing import DataRoutedParams
    from workbench.serving.api import ChatRequest, CompletionRequest

    out += [("DataRoutedParams (routed methods' base)", DataRoutedParams, {}),
            ("serving CompletionRequest", CompletionRequest, {"model": "base", "prompt": "x"}),
            ("serving ChatRequest", ChatRequest, {"model": "base", "messages": [{"role": "user", "content": "x"}]})]
    return out


def unbounded(schema_cls: type[BaseModel]) -> list[str]:
    """Numeric fields of a schema without an upper bound (le/lt)."""
    js = schema_cls.model_json_schema(by_alias=True)
    return [".".join(path) for path, node in _numbers(js, js.get("$defs", {}))
            if "maximum" not in node and "exclusiveMaximum" not in node]


def test_every_numeric_parameter_is_finite_and_bounded():
    """Every registered method's Params (via METHODS), the recipe and comparison schemas and the training configs:
    every int/float field has an upper bound, and rejects inf and nan. A new unbounded field fails here."""
    schemas = _schemas()
    assert len(schemas) > 15  # every method is registered
    for what, cls, base in schemas:
        assert cls.model_validate(base) is not None, what
        assert unbounded(cls) == [], f"{what}: no upper bound on {unbounded(cls)}"
        js = cls.model_json_schema(by_alias=True)
        for path, _node in _numbers(js, js.get("$defs", {})):
            field = [p for p in path if p not in ("[]", "{}")][-1]
            for bad in (INF, -INF, NAN):
                with pytest.raises(ValidationError) as e:
                    cls.model_validate(_merge(base, _document(path, bad)))
                locs = [[str(x) for x in err["loc"]] for err in e.value.errors()]
                assert any(field in loc for loc in locs), (what, path, bad, locs)


def test_the_bounds_check_finds_a_new_unbounded_field():
    from pydantic import Field

    from workbench.methods.base import MethodParams

    class New(MethodParams):
        fine: int = Field(1, gt=0, le=10)
        steps: int = Field(1, gt=0)
        scale: float | None = None

    assert unbounded(New) == ["steps", "scale"]


def test_batch_order_is_lazy():
    """`steps: 10**12` used to hang building steps * batch_size indices up front; the order is now made a step at a
    time, and is the same seeded sequence as before (a resumed run sees the same batches)."""
    import itertools
    import random

    from workbench.methods.upcycle import batch_order

    tracemalloc.start()
    try:
        first = next(iter(batch_order(5, 200_000, 4, seed=3)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak:,} bytes for the first batch"
    rng, order, want = random.Random(3), [], []
    for _ in range(7):  # the former definition, written out
        batch = []
        for _ in range(4):
            if not order:
                order = list(range(5))
                rng.shuffle(order)
            batch.append(order.pop())
        want.append(batch)
    assert first == want[0] and list(itertools.islice(batch_order(5, 10**12, 4, seed=3), 7)) == want


@pytest.mark.parametrize("method,params,message", [
    ("btx", {"lr": INF}, r"parameters\.lr: Input should be a finite number"),
    ("btx", {"router_lr": INF}, r"parameters\.router_lr: Input should be a finite number"),
    ("btx", {"aux_loss_coef": INF}, r"parameters\.aux_loss_coef: Input should be a finite number"),
    ("btx", {"router_std": INF}, r"parameters\.router_std: Input should be a finite number"),
    ("btx", {"lr": NAN}, r"parameters\.lr: Input should be a finite number"),
    ("btx", {"steps": 10**12}, r"parameters\.steps: Input should be less than or equal to 100000"),
    ("btx", {"steps": 100, "warmup": 100}, r"parameters: warmup 100 is not below steps 100 \(the learning rate would"),
    ("btx", {"warmup": 10**12}, r"parameters\.warmup: Input should be less than or equal to 100000"),
    ("btx", {"batch_size": 10**6}, r"parameters\.batch_size: Input should be less than or equal to 4096"),
    ("btx", {"examples": 10**12}, r"parameters\.examples: Input should be less than or equal to 1000000"),
    ("btx", {"seed": 2**40}, r"parameters\.seed: Input should be less than or equal to 4294967295"),
    ("btx", {"seed": -1}, r"parameters\.seed: Input should be greater than or equal to 0"),
    ("ties", {"lambda": 1e9}, r"parameters\.lambda: Input should be less than or equal to 1000"),
    ("ties", {"weight": -INF}, r"parameters\.weight: Input should be a finite number"),
    ("mole", {"steps": 10, "warmup": 20}, r"parameters: warmup 20 is not below steps 10"),
    ("smora", {"rank": 10**6}, r"parameters\.rank: Input should be less than or equal to 4096"),
    ("arrow", {"temperature": 1e9}, r"parameters\.temperature: Input should be less than or equal to 10000"),
])
def test_huge_or_infinite_parameters_fail_in_one_line_nothing_written(two, tiny_dir, arts, pools, tmp_path, run_cli,
                                                                     method, params, message):
    from workbench.recipes import parse_recipe

    two.add(tiny_dir / "full_c", "c", tags={"task": "unit_conversion"}, data=suite_data("unit_conversion"))
    experts = ["c", "a"] if method in ("btx",) else ["a", "b"]
    recipe = {"name": "big", "method": method, "pool": "demo", "experts": experts,
              "parameters": {"materialize": True, **params} if method == "btx" else params}
    before = {"pools": snapshot(pools), "artifacts": snapshot(arts)}
    with pytest.raises(RecipeError, match=message) as e:
        parse_recipe(recipe)
    one_line(e)
    f = tmp_path / "big.yaml"
    f.write_text(yaml.safe_dump(recipe))  # .inf / .nan in YAML
    for args in (["--dry-run"], []):
        code, out, err = run_cli("merge", str(f), *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and message.split(":")[0].replace("\\", "") in err, err
    assert {"pools": snapshot(pools), "artifacts": snapshot(arts)} == before


@pytest.mark.parametrize("change,message", [
    ({"eval": {"limit": 10**12}}, r"eval\.limit: Input should be less than or equal to 100000"),
    ({"eval": {"batch_size": 10**9}}, r"eval\.batch_size: Input should be less than or equal to 4096"),
    ({"sweep": {"parameters": {"density": [0.5]}, "limit": 10**12}}, r"sweep\.limit: Input should be less than"),
    ({"sweep": {"parameters": {"density": [0.1 + i / 1e4 for i in range(40)],
                               "lambda": [0.1 + i / 1e3 for i in range(40)]}}},
     r"sweep: the grid has 1,600 points \(at most 1024\)"),
    ({"sweep": {"parameters": {"lambda": [0.5, INF]}}},
     r"sweep point \{'lambda': inf\}: parameters\.lambda: Input should be a finite number"),
])
def test_recipe_eval_and_sweep_bounds(two, change, message):
    from workbench.recipes import parse_recipe

    with pytest.raises(RecipeError, match=message) as e:
        parse_recipe({"name": "x", "method": "ties", "pool": "demo", **change})
    one_line(e)


@pytest.mark.parametrize("change,message", [
    ({"eval": {"limit": 10**12}}, r"eval\.limit: Input should be less than or equal to 100000"),
    ({"seeds": [0, 2**33]}, r"seeds\.1: Input should be less than or equal to 4294967295"),
    ({"seeds": list(range(101))}, r"seeds: List should have at most 100 items"),
    ({"entries": [{"method": "ties", "parameters": {"lambda": INF}}]}, r"parameters\.lambda: Input should be a finite"),
])
def test_comparison_bounds(two, tmp_path, change, message):
    from workbench.comparison import parse_comparison

    doc = {"name": "c", "pool": "demo", "entries": ["base", {"method": "ties"}], "tasks": ["addition"], **change}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    before = snapshot(tmp_path)
    with pytest.raises(RecipeError, match=message) as e:
        parse_comparison(f)
    one_line(e)
    assert snapshot(tmp_path) == before


def test_training_config_bounds():
    from workbench.train.trainer import FullConfig, LoraConfigModel

    for cfg, kw in [(LoraConfigModel, {"lr": INF}), (LoraConfigModel, {"steps": 10**12}),
                    (LoraConfigModel, {"steps": 3, "warmup": 3}), (FullConfig, {"weight_decay": NAN}),
                    (FullConfig, {"lr": 2.0}), (LoraConfigModel, {"r": 10**6})]:
        with pytest.raises(ValidationError):
            cfg(**kw)
    assert LoraConfigModel(steps=3).warmup == 2  # a default warm-up longer than the training: clamped to steps - 1
    assert LoraConfigModel(steps=30).warmup == 10  # a default that fits is left as it is
    assert LoraConfigModel(steps=3, warmup=2).warmup == 2


# ----------------------------------------------------------------------------- 3. experts: [] is refused


EMPTY = r"experts: \[\] lists no expert \(leave it out to use the whole pool\)$"


def test_empty_expert_list_is_refused_in_recipes_and_comparisons(two, arts, pools, tmp_path, run_cli):
    from workbench.comparison import parse_comparison
    from workbench.recipes import parse_recipe

    before = {"pools": snapshot(pools), "artifacts": snapshot(arts)}
    with pytest.raises(RecipeError, match=r"^recipe <recipe>: " + EMPTY) as e:
        parse_recipe({"name": "x", "method": "ties", "pool": "demo", "experts": []})
    one_line(e)
    f = tmp_path / "empty.yaml"
    f.write_text("name: x\nmethod: ties\npool: demo\nexperts: []\n")
    for args in (["--dry-run"], []):
        code, out, err = run_cli("merge", str(f), *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and "experts: [] lists no expert" in err, err
    entry = {"entries": ["base", {"method": "ties", "experts": []}]}
    for doc, where in [({"experts": []}, r"comparison \S+: "), (entry, r"comparison \S+: entries\.1\.\S+\.")]:
        c = tmp_path / "cmp.yaml"
        c.write_text(yaml.safe_dump({"name": "c", "pool": "demo", "entries": ["base", {"method": "ties"}], **doc}))
        with pytest.raises(RecipeError, match="^" + where + EMPTY) as e:
            parse_comparison(c)
        one_line(e)
        code, out, err = run_cli("compare", str(c), "--dry-run")
        assert code == 2 and err.count("\n") == 1 and "experts: [] lists no expert" in err, err
    assert {"pools": snapshot(pools), "artifacts": snapshot(arts)} == before
    assert [e.name for e in parse_recipe({"name": "x", "method": "ties", "pool": "demo"}).experts] == ["a", "b"]


# ----------------------------------------------------------------------------- 4. hostile files


@pytest.mark.parametrize("text,key,line", [
    ("name: x\nmethod: ties\nname: y\n", "name", 3),
    ("name: x\nmethod: ties\nparameters:\n  lambda: 0.5\n  density: 0.5\n  lambda: 2\n", "lambda", 6),
    ("name: x\nmethod: ties\nparameters: {weight: 1, weight: 2}\n", "weight", 3),
])
def test_duplicate_yaml_keys_are_refused(two, arts, tmp_path, run_cli, text, key, line):
    from workbench.recipes import parse_recipe

    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError, match=rf"dup\.yaml is not valid YAML: duplicate key '{key}' \(each key once\) "
                                          rf"\(line {line}, column \d+\)$") as e:
        parse_recipe(f)
    one_line(e)
    before = snapshot(arts)
    code, out, err = run_cli("merge", str(f), "--dry-run")
    assert code == 2 and out == "" and err.count("\n") == 1 and f"duplicate key '{key}'" in err
    assert snapshot(arts) == before


def test_comparison_recipes_are_confined_to_its_folder_and_merges(two, tmp_path, run_cli):
    from workbench.comparison import MERGES_DIR, parse_comparison

    folder = tmp_path / "cmp"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.yaml"
    recipe = {"name": "r", "method": "ties", "pool": "demo", "experts": ["a", "b"]}
    for f in (outside, folder / "here.yaml", folder / "sub" / "there.yaml"):
        f.write_text(yaml.safe_dump(recipe))
    (folder / "link.yaml").symlink_to(outside)

    def comparison(ref: str):
        c = folder / "c.yaml"
        c.write_text(yaml.safe_dump({"name": "c", "pool": "demo", "entries": ["base", {"recipe": ref}]}))
        return c

    for ref in ("../outside.yaml", str(outside), "link.yaml", "sub/../../outside.yaml", "/etc/hostname"):
        with pytest.raises(RecipeError, match=r"entries\.1: recipe \S+ is outside the comparison's folder and the "
                                              r"project's merges/ folder \(recipes are read from there only\)$") as e:
            parse_comparison(comparison(ref))
        one_line(e)
        code, _, err = run_cli("compare", str(comparison(ref)), "--dry-run")
        assert code == 2 and err.count("\n") == 1 and "is outside the comparison's folder" in err, err
    for ref in ("here.yaml", "sub/there.yaml", str(folder / "here.yaml")):
        assert [r.name for r in parse_comparison(comparison(ref)).rows] == ["base", "r"]
    # the project's recipes are readable from anywhere (they fail here on this pool's experts, not on the path)
    with pytest.raises(RecipeError) as e:
        parse_comparison(comparison(str(MERGES_DIR / "ties-lora.yaml")))
    assert "outside" not in str(e.value)


def test_validation_errors_echo_at_most_40_characters_of_input(two):
    import re

    from workbench.recipes import parse_recipe

    for params in ({"density": "z" * 1000}, {"q" * 1000: 1}, {"per_expert": {"a": {"weight": "z" * 1000}}}):
        with pytest.raises(RecipeError) as e:
            parse_recipe({"name": "x", "method": "ties", "pool": "demo", "parameters": params})
        msg = one_line(e)
        assert "..." in msg and max(len(m) for m in re.findall(r"z+|q+", msg)) <= 40, msg


# ----------------------------------------------------------------------------- issue 26's review: minor bounds


@pytest.mark.parametrize("text,what", [
    ("name: x\nmethod: ties\nparameters: {<<: {density: 0.3}, density: 0.7}\n", "recipe"),
    ("name: x\nmethod: ties\nbase: &b {density: 0.3}\nparameters:\n  <<: {density: 0.3}\n", "recipe"),
])
def test_yaml_merge_keys_are_refused(two, tmp_path, text, what):
    """`<<: {lambda: 0.3}` beside `lambda: 0.7` was silently 0.7 (the duplicate check skipped merge keys)."""
    from workbench.recipes import parse_recipe

    f = tmp_path / "merge.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError, match=r"merge\.yaml is not valid YAML: (merge keys \(<<\) are not allowed|aliases)") \
            as e:
        parse_recipe(f)
    one_line(e)


def test_a_comparisons_duplicate_key_error_says_comparison(two, tmp_path):
    from workbench.comparison import parse_comparison

    f = tmp_path / "c.yaml"
    f.write_text("name: c\npool: demo\nentries: [base]\ntasks: [addition]\nname: d\n")
    with pytest.raises(RecipeError, match=r"^comparison .*c\.yaml is not valid YAML: duplicate key 'name'") as e:
        parse_comparison(f)
    one_line(e)


@pytest.mark.parametrize("method,params,bad", [("task_arithmetic", {"lambda": True}, "lambda"),
                                               ("ties", {"density": False}, "density"), ("twin", {"rank": True}, "rank")])
def test_true_or_false_is_not_a_number(two, method, params, bad):
    """Pydantic's lax mode read `lambda: true` as 1.0; numeric parameters are strict numbers, in the recipe and in a
    sweep point (every shipped recipe still parses: test_demo_shipped)."""
    from workbench.recipes import parse_recipe

    with pytest.raises(RecipeError, match=rf"parameters\.{bad}: a number is needed, got .*true/false is not a number")\
            as e:
        parse_recipe({"name": "x", "method": method, "pool": "demo", "parameters": params})
    one_line(e)
    with pytest.raises(RecipeError, match=rf"sweep point .*parameters\.{bad}: a number is needed") as e:
        parse_recipe({"name": "x", "method": method, "pool": "demo", "sweep": {"parameters": {k: [v] for k, v in
                                                                                             params.items()}}})
    assert parse_recipe({"name": "x", "method": "ties", "pool": "demo", "parameters": {"density": 1}}).params.density == 1


def test_a_default_warmup_longer_than_the_training_is_clamped_in_the_validated_params(two):
    """MoLE with `steps: 3` and its default warm-up (8) never reached its learning rate; the default is clamped to
    steps - 1 while validating (the key says what trains); an explicit warm-up is still refused in one line."""
    from workbench.recipes import parse_recipe

    r = parse_recipe({"name": "m", "method": "mole", "pool": "demo", "parameters": {"steps": 3}})
    assert r.params.warmup == 2 and r.key_body["params"]["warmup"] == 2
    assert parse_recipe({"name": "m", "method": "mole", "pool": "demo", "parameters": {"steps": 30}}).params.warmup == 8
    assert parse_recipe({"name": "s", "method": "smora", "pool": "demo", "parameters": {"steps": 1}}).params.warmup == 0
    with pytest.raises(RecipeError, match=r"warmup 5 is not below steps 3") as e:
        parse_recipe({"name": "m", "method": "mole", "pool": "demo", "parameters": {"steps": 3, "warmup": 5}})
    one_line(e)


def test_route_trace_reads_at_most_1_mib_of_a_device_or_standard_input(run_cli, two, tmp_path, monkeypatch):
    """--prompt-file /dev/zero (st_size 0) was read without bound, and `-` read all of standard input first: at most
    1 MiB + 1 byte is read, then one line refuses it, before any build."""
    import io
    import sys

    from workbench.tracing import MAX_PROMPT_CHARS, read_prompt

    recipe = tmp_path / "arrow.yaml"
    recipe.write_text(yaml.safe_dump({"name": "arrow-t", "method": "arrow", "pool": "demo", "parameters": {"k": 1}}))
    code, _out, err = run_cli("route", "trace", str(recipe), "--prompt-file", "/dev/zero")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "--prompt-file /dev/zero: over 1,048,576 bytes" in lines[0], err

    class Counting(io.BytesIO):
        asked: list[int]

        def read(self, n=-1):
            self.asked.append(n)
            return super().read(n)

    stdin = Counting(b"1+1=" * (MAX_PROMPT_CHARS // 2))  # 2 MiB
    stdin.asked = []
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin, encoding="utf-8"))
    code, _out, err = run_cli("route", "trace", str(recipe), "--prompt-file", "-")
    assert code == 2 and "standard input: over 1,048,576 bytes" in err, err
    assert stdin.asked == [MAX_PROMPT_CHARS + 1] and stdin.tell() == MAX_PROMPT_CHARS + 1  # never read to the end
    assert read_prompt("-", io.BytesIO(b"2+2=\n")) == "2+2=\n"
    assert not list((tmp_path).glob("*.json"))


def test_replacing_older_runs_skips_a_deeply_nested_manifest(tmp_path):
    """A 100,000-deep run_*.json beside a model's runs raised RecursionError out of every evaluate writing there;
    it is skipped (left alone), and an older run of the same settings is still replaced."""
    import json

    from workbench.eval.record import replace_older_runs

    manifest = {"run_id": "2026-01-03", "model": "m", "model_name": "p__m", "tasks": ["addition"], "limit": 2}
    (tmp_path / "run_2026-01-01.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "run_2026-01-02.json").write_text(json.dumps({**manifest, "run_id": "2026-01-02"}))
    (tmp_path / "results_2026-01-02.json").write_text("{}")
    assert replace_older_runs(tmp_path, manifest) == ["2026-01-02"]
    assert (tmp_path / "run_2026-01-01.json").is_file() and not (tmp_path / "results_2026-01-02.json").exists()
