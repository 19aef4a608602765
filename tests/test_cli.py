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
