"""Recipes: hostile files fail in one short line; the artifact key covers the method's version and the
data it reads; experts' files are checked (existence when parsing, hashes before building)."""

import json
import shutil

import pytest
import yaml
from conftest import one_line, quiet, snapshot

from workbench.errors import RecipeError
from workbench.recipes import MAX_RECIPE_BYTES, build, parse_recipe


# ----------------------------------------------------------------------------- hostile recipe files


def test_alias_bomb_is_refused_unexpanded(tmp_path):
    # name: a list of 10^6 strings through 6 levels of aliases (never expanded: the first alias stops it)
    levels = ["  l0: &l0 [" + ", ".join(['"lol"'] * 10) + "]"]
    levels += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 7)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("method: ties\nparameters:\n" + "\n".join(levels) + "\nname: *l6\n")
    with pytest.raises(RecipeError, match=r"bomb\.yaml is not valid YAML: aliases \(\*name\) are not allowed in "
                                          r"recipes \(line 4, column \d+\)$") as e:
        parse_recipe(bomb)
    one_line(e)


def test_binary_file(tmp_path):
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"name: x\n" + bytes(range(256)) * 64)
    with pytest.raises(RecipeError, match=r"binary\.yaml is not UTF-8 text \(invalid byte at offset 136\)$") as e:
        parse_recipe(f)
    one_line(e)


def test_oversized_file_is_not_read(tmp_path):
    f = tmp_path / "big.yaml"
    line = "name: x\nmethod: ties\n" + "".join(f"k{i}: {i}\n" for i in range(MAX_RECIPE_BYTES // 8))
    f.write_text(line)  # valid YAML, just over 1 MiB
    with pytest.raises(RecipeError, match=r"big\.yaml is over 1 MiB \([\d,]+ bytes\)$") as e:
        parse_recipe(f)
    one_line(e)


def test_deep_nesting(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: x\nmethod: ties\nparameters: {weight: " + "[" * 500 + "]" * 500 + "}\n")
    with pytest.raises(RecipeError, match=r"deep\.yaml is not valid YAML: nested more than 32 levels deep "
                                          r"\(line 3, column \d+\)$") as e:
        parse_recipe(deep)
    one_line(e)
    nested: list = []
    for _ in range(500):
        nested = [nested]
    with pytest.raises(RecipeError, match=r"recipe <recipe>: nested more than 32 levels deep$") as e:
        parse_recipe({"name": "x", "method": "ties", "parameters": {"weight": nested}})
    one_line(e)


@pytest.mark.parametrize("data,message", [
    ({"name": ["x" * 100_000], "method": "ties"}, r"name: Input should be a valid string \(got \['xxx.*\.\.\.\)$"),
    ({"name": "x", "method": "m" * 100_000}, r"method: String should have at most 64 characters \(got 'mmm.*\.\.\.\)$"),
    ({"name": "x", "method": "ties", "k" * 100_000: 1}, r"recipe <recipe>: kkk+\.\.\.: Extra inputs are not permitted"),
    ({"name": "x", "method": "ties", "experts": ["e" * 100_000]}, r"experts\.0: String should have at most 1024"),
    ({"name": "x", "method": "ties", "sweep": {"parameters": {"density": [0.5, ["z"] * 100_000]}}},
     r"sweep point \{'density': \['z', .*\.\.\.: parameters\.density: Input should be a valid number"),
    ({"name": "x", "method": "ties", "parameters": {"per_expert": {"p" * 100_000: {"weight": 0}}}},
     r"per_expert names experts not in the merge: \['ppp"),
    ({"name": "../../../x\n", "method": "ties"}, r"name: String should match pattern"),
])
def test_errors_never_echo_unbounded_input(pool, tiny_dir, data, message):
    pool.add(tiny_dir / "lora_a", "a")
    with pytest.raises(RecipeError, match=message) as e:
        parse_recipe({"pool": str(pool.root), **data})
    one_line(e)


# ----------------------------------------------------------------------------- artifact keys


def test_key_covers_method_version_and_key_inputs(pool, tiny_dir, tmp_path, monkeypatch):
    from workbench.methods import METHODS

    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    pool.add(tiny_dir / "lora_a", "a")
    recipe = {"name": "k", "pool": str(pool.root), "method": "task_arithmetic", "experts": ["a"]}

    def meta(folder):
        return json.loads((folder / "artifact.json").read_text())

    first = build(parse_recipe(recipe), log=quiet)
    assert build(parse_recipe(recipe), log=quiet) == first  # same key: reused
    cls = METHODS.get("task_arithmetic")
    assert meta(first)["method_version"] == cls.version and meta(first)["key_inputs"] == {}
    monkeypatch.setattr(cls, "version", cls.version + 1)  # a fixed method: its old artifacts are stale
    bumped = build(parse_recipe(recipe), log=quiet)
    assert bumped != first and meta(bumped)["method_version"] == cls.version
    seen = []
    for data in ("v4-aaaa", "v5-bbbb"):  # the data a build reads changed (e.g. a new task suite)
        monkeypatch.setattr(cls, "key_inputs", lambda self, experts, params, d=data: {"addition": d})
        seen.append(build(parse_recipe(recipe), log=quiet))
        assert meta(seen[-1])["key_inputs"] == {"addition": data}
    assert len({first, bumped, *seen}) == 4


# ----------------------------------------------------------------------------- experts' files


def test_linked_expert_changed_after_adding(pool, tiny_dir, tmp_path, monkeypatch, run_cli, capsys):
    from safetensors.torch import load_file, save_file

    from workbench import io

    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    src = shutil.copytree(tiny_dir / "lora_a", tmp_path / "linked")
    pool.add(src, "a", link=True)
    pool.add(tiny_dir / "lora_b", "b")
    recipe = {"name": "l", "pool": str(pool.root), "method": "task_arithmetic", "experts": ["a", "b"]}
    hashed = []
    monkeypatch.setattr(io, "sha256_file", lambda path, *a, real=io.sha256_file: hashed.append(path) or real(path, *a))
    build(parse_recipe(recipe), log=quiet)
    n_files = len(pool.expert("a").entry.files) + len(pool.expert("b").entry.files)
    build(parse_recipe(recipe), force=True, log=quiet)
    assert len(hashed) == n_files  # each file hashed once per process, not once per build
    weights = src / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(weights).items()}, str(weights), metadata={"format": "pt"})
    before = snapshot(tmp_path / "artifacts")
    for force in (False, True):  # neither the old artifact nor a rebuild under the old key
        with pytest.raises(RecipeError, match=r"^expert 'a': .*linked/adapter_model\.safetensors changed since it "
                                              r"was added \(sha256 mismatch\); check with `workbench pool verify demo`"
                           ) as e:
            build(parse_recipe(recipe), force=force, log=quiet)
        one_line(e)
    f = tmp_path / "l.yaml"
    f.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()  # the first build's progress bars
    code, _, err = run_cli("merge", str(f))
    assert code == 2 and err.count("\n") == 1 and "changed since it was added" in err
    assert snapshot(tmp_path / "artifacts") == before


def test_deleted_expert_folder_fails_when_parsing(pool, tiny_dir, tmp_path, run_cli):
    pool.add(tiny_dir / "full_c", "c")
    shutil.rmtree(pool.expert("c").path)
    recipe = {"name": "gone", "pool": str(pool.root), "method": "ties", "experts": ["c"]}
    with pytest.raises(RecipeError, match=r"^recipe <recipe>: expert 'c' is missing \S+/experts/c/\S+ \(moved or "
                                          r"deleted\? `workbench pool verify demo` lists what is missing\)$") as e:
        parse_recipe(recipe)
    one_line(e)
    f = tmp_path / "gone.yaml"
    f.write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli("merge", str(f), "--dry-run")
    assert code == 2 and out == "" and err.count("\n") == 1 and "expert 'c' is missing" in err
