"""CLI: every pool command end to end, exit code 2 and one line on user error."""

import json

from conftest import snapshot


def test_pool_commands(run_cli, pools, tiny_dir):
    code, out, err = run_cli("pool", "create", "demo", "--base", str(tiny_dir / "base"))
    assert code == 0, err
    assert "created" in out
    code, out, err = run_cli("pool", "add", "demo", str(tiny_dir / "lora_a"), "--name", "add", "--tag", "task=addition")
    assert code == 0, err
    code, out, err = run_cli("pool", "add", "demo", str(tiny_dir / "full_c"))
    assert code == 0, err
    code, out, _ = run_cli("pool", "list", "demo")
    assert "add" in out and "full_c" in out and "task=addition" in out
    code, out, _ = run_cli("pool", "list")
    assert "demo" in out
    code, out, _ = run_cli("pool", "show", "demo", "add")
    assert json.loads(out)["tags"] == {"task": "addition"}
    code, out, _ = run_cli("pool", "verify", "demo")
    assert code == 0 and "2 experts verified" in out
    code, out, _ = run_cli("pool", "remove", "demo", "full_c")
    assert code == 0
    code, out, _ = run_cli("pool", "list", "demo")
    assert "full_c" not in out


def test_user_errors_exit_2_with_one_line(run_cli, pools, tiny_dir):
    run_cli("pool", "create", "demo", "--base", str(tiny_dir / "base"))
    before = snapshot(pools)
    cases = [
        (("pool", "add", "demo", str(tiny_dir / "lora_a"), "--name", "../x"), "invalid expert name"),
        (("pool", "add", "nopool", str(tiny_dir / "lora_a")), "no pool at"),
        (("pool", "add", "demo", str(tiny_dir / "lora_a"), "--tag", "oops"), "invalid --tag 'oops'"),
        (("pool", "create", "x", "--base", "smollm2-13m"), "did you mean 'smollm2-135m'"),
        (("pool", "show", "demo", "nobody"), "has no expert 'nobody'"),
    ]
    for args, message in cases:
        code, out, err = run_cli(*args)
        assert code == 2, (args, out, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, err)
        assert "Traceback" not in err
    assert snapshot(pools) == before


def test_help_everywhere(run_cli):
    for args in [(), ("pool",), ("base",), ("pool", "add"), ("base", "info")]:
        code, out, _ = run_cli(*args, "--help")
        assert code == 0 and "Usage" in out


def test_merge_cli_dry_run_and_errors(run_cli, pools, tiny_dir, tmp_path):
    import yaml

    run_cli("pool", "create", "demo", "--base", str(tiny_dir / "base"))
    run_cli("pool", "add", "demo", str(tiny_dir / "lora_a"), "--name", "a")
    run_cli("pool", "add", "demo", str(tiny_dir / "lora_b"), "--name", "b")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"name": "g", "pool": "demo", "method": "ties", "parameters": {"density": 0.5},
                                    "sweep": {"parameters": {"lambda": [0.5, 1.0]}}}))
    code, out, err = run_cli("merge", str(good), "--dry-run")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["experts"] == ["a", "b"] and plan["sweep"] == [{"lambda": 0.5}, {"lambda": 1.0}]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "pool": "demo", "method": "ties", "parameters": {"density": 1.5}}))
    code, out, err = run_cli("merge", str(good), str(bad))  # the bad one stops both before any work
    assert code == 2 and err.count("\n") == 1 and "parameters.density" in err
    code, out, err = run_cli("methods")
    assert code == 0 and "pcb" in out and "twin" in out


def test_every_method_module_registers():
    import importlib
    import pkgutil

    from workbench import methods
    from workbench.methods.base import METHODS

    helpers = {"base", "merge_io", "streaming", "routing", "upcycle"}  # shared code of the merges, routed, upcycling
    for mod in pkgutil.iter_modules(methods.__path__):
        if mod.name in helpers:
            continue
        module = importlib.import_module(f"workbench.methods.{mod.name}")
        registered = [n for n in METHODS.names() if METHODS.get(n).__module__ == module.__name__]
        assert registered, f"workbench/methods/{mod.name}.py registers no method"
