import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# Without a GPU, Triton kernels run in its interpreter on CPU tensors (must be set before import).
if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from workbench.testing import make_tiny_base, make_tiny_full, make_tiny_lora


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """One cache (base models, task suite) per test session; $WORKBENCH_TEST_CACHE reuses one."""
    path = os.environ.get("WORKBENCH_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE", path)
    yield Path(path)
    mp.undo()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny base, two LoRA experts and one full expert, built once per session."""
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_base(d / "base", seed=0)
    make_tiny_lora(d / "base", d / "lora_a", seed=1, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    make_tiny_lora(d / "base", d / "lora_b", seed=2, r=2, alpha=4, target_modules=("q_proj", "o_proj", "up_proj"))
    make_tiny_full(d / "base", d / "full_c", seed=3)
    return d


@pytest.fixture()
def pools(tmp_path, monkeypatch) -> Path:
    """An isolated adapters/ folder and cache for one test."""
    monkeypatch.setenv("WORKBENCH_POOLS", str(tmp_path / "adapters"))
    return tmp_path / "adapters"


@pytest.fixture()
def pool(pools, tiny_dir):
    from workbench.pool import Pool

    return Pool.create("demo", base=str(tiny_dir / "base"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: 'nothing on disk changed' means equal snapshots."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def run_cli(monkeypatch, capsys):
    """Run `workbench ARGS` in-process through main(); returns (exit code, stdout, stderr)."""
    from workbench import cli

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["workbench", *args])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
