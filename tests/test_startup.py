"""Commands that need no model start fast: they never import torch and friends; pools are found from anywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "lm_eval", "mergekit")

# Runs CLI commands in one fresh interpreter, then reports which heavy modules got imported.
RUN_COMMANDS = """
import json, sys
from workbench import cli

commands, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
codes = []
for args in commands:
    sys.argv = ["workbench", *args]
    try:
        cli.main()
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code or 0)
print(json.dumps({"codes": codes, "heavy": [m for m in heavy if m in sys.modules]}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_POOLS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def _python(code: str, *args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """`python -c code args` in a fresh interpreter, from `cwd`, without $WORKBENCH_POOLS unless given."""
    return subprocess.run([sys.executable, "-c", code, *args], check=False, cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=120)


def _run(commands: list[list[str]]) -> tuple[dict, str]:
    proc = _python(RUN_COMMANDS, json.dumps(commands), json.dumps(HEAVY))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_pool_and_methods_commands_import_no_model_library():
    report, out = _run([["pool", "list"], ["pool", "list", "demo"], ["pool", "show", "demo"], ["methods"]])
    assert report["codes"] == [0, 0, 0, 0], out
    assert "demo" in out and "task_arithmetic" in out and "twin" in out
    assert report["heavy"] == [], f"imported at startup: {report['heavy']}"


def test_method_registry_is_complete_without_torch():
    """Listing the methods imports every method module (the registry finds them), none of which imports torch."""
    code = (
        "import json, pkgutil, sys\n"
        "from workbench import methods\n"
        "from workbench.artifacts import LOADERS\n"
        "from workbench.methods import METHODS\n"
        "names = METHODS.names()\n"
        "mods = [m.name for m in pkgutil.iter_modules(methods.__path__)]\n"
        "print(json.dumps({'names': names, 'loaders': sorted(LOADERS),\n"
        "                  'missing': [m for m in mods if 'workbench.methods.' + m not in sys.modules],\n"
        f"                  'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    names, missing, heavy, loaders = report["names"], report["missing"], report["heavy"], report["loaders"]
    assert {"task_arithmetic", "ties", "pcb", "twin", "mole", "smora", "btx", "bam", "mergekit_moe"} <= set(names)
    assert missing == [] and heavy == []
    assert {"merged_model", "merged_lora", "routed_lora"} <= set(loaders)


def test_unknown_method_still_suggests():
    from workbench.errors import RecipeError
    from workbench.methods import METHODS

    with pytest.raises(RecipeError, match="did you mean 'ties'"):
        METHODS.get("tie")


POOL_OPEN = "from workbench.pool import Pool; print(Pool.open('demo').root.resolve())"


def test_demo_pool_opens_from_any_folder(tmp_path):
    """No ./adapters and no $WORKBENCH_POOLS: the project's adapters/ folder (a source install)."""
    proc = _python(POOL_OPEN, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str((ROOT / "adapters" / "demo").resolve())


def test_local_adapters_folder_wins(tmp_path):
    (tmp_path / "adapters" / "demo").mkdir(parents=True)
    proc = _python(POOL_OPEN, cwd=tmp_path)
    # ./adapters exists, so it is the pools folder: its demo has no manifest, and the error names where it looked
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert "no pool at adapters/demo" in error and "WORKBENCH_POOLS" in error, error
    assert f"pools folder {(tmp_path / 'adapters').resolve()} " in error, error


def test_workbench_pools_wins(tmp_path):
    (tmp_path / "adapters" / "demo").mkdir(parents=True)
    proc = _python(POOL_OPEN, cwd=tmp_path, WORKBENCH_POOLS=str(ROOT / "adapters"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str((ROOT / "adapters" / "demo").resolve())


def test_pools_dir_resolution(tmp_path, monkeypatch):
    from workbench.pool import pools_dir, resolve_pool_path

    monkeypatch.delenv("WORKBENCH_POOLS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert pools_dir().resolve() == (ROOT / "adapters").resolve()
    assert resolve_pool_path("demo").resolve() == (ROOT / "adapters" / "demo").resolve()
    (tmp_path / "adapters").mkdir()
    assert pools_dir() == Path("adapters")
    assert resolve_pool_path("demo") == Path("adapters") / "demo"
    monkeypatch.setenv("WORKBENCH_POOLS", str(tmp_path / "elsewhere"))
    assert pools_dir() == tmp_path / "elsewhere"
    assert resolve_pool_path("demo") == tmp_path / "elsewhere" / "demo"


def test_registry_loads_on_first_lookup_once():
    from workbench.errors import WorkbenchError
    from workbench.registry import Registry

    calls = []

    def load():
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("first try fails")
        reg.add("alpha", 1)
        assert reg.get("alpha") == 1  # a lookup while loading sees what is registered so far

    reg = Registry("thing", WorkbenchError, load=load)
    reg.add("beta", 2)  # registering does not load
    assert calls == []
    with pytest.raises(ImportError):
        reg.names()
    assert reg.names() == ["alpha", "beta"] and "alpha" in reg and list(reg) == ["alpha", "beta"]
    with pytest.raises(WorkbenchError, match="did you mean 'alpha'"):
        reg.get("alpah")
    assert calls == [1, 1]
