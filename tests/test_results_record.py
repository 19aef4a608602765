"""The committed results record names no path of the machine that made it."""

import gzip
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
# An absolute path of a POSIX machine (system roots where users and caches live), or this checkout's own
# location, or this user's home: none belongs in a record that other machines read.
_ROOTS = ("root", "home", "tmp", "work", "Users", "var", "opt", "mnt", "private", "srv", "usr", "data")
_ABS = re.compile(r"(?<![\w.~$-])/(?:" + "|".join(_ROOTS) + r")/[^\s\"']+")
_TEXT = {".json", ".jsonl", ".md", ".csv", ".svg", ".txt", ".yaml"}


def _texts(root: Path):
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".gz":
            yield p, gzip.decompress(p.read_bytes()).decode("utf-8", "replace")
        elif p.suffix in _TEXT:
            yield p, p.read_text("utf-8", "replace")


def find_absolute_paths(root: Path) -> list[str]:
    local = [str(RESULTS.parent), str(Path.home())]
    hits = []
    for p, text in _texts(root):
        found = _ABS.findall(text) + [s for s in local if s != "/" and s in text]
        if found:
            hits.append(f"{p.relative_to(root)}: {sorted(set(found))[:3]}")
    return hits


def test_scanner_finds_paths(tmp_path):
    (tmp_path / "a.json").write_text('{"data_files": {"test": "/root/.cache/workbench/tasks/x/test.jsonl"}}')
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"artifact": "/tmp/pytest-of-x/a/artifacts/ties-1"}\n'))
    (tmp_path / "ok.json").write_text('{"question": "Convert 3 km/h to m/s", "path": "$WORKBENCH_CACHE/tasks/x"}')
    hits = find_absolute_paths(tmp_path)
    assert len(hits) == 2 and hits[0].startswith("a.json") and hits[1].startswith("b.jsonl.gz"), hits


def test_committed_results_have_no_machine_paths():
    assert RESULTS.is_dir()
    hits = find_absolute_paths(RESULTS)
    assert not hits, f"{len(hits)} files name absolute machine paths, e.g. {hits[:5]}"


def test_git_state_dirty_ignores_the_results_folder(tmp_path, monkeypatch):
    """A job's own outputs under results/ (tracked files it rewrites) do not make the tree dirty; a changed
    tracked file elsewhere does, from any working folder inside the repository."""
    import subprocess

    from workbench.eval.harness import git_state

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "plan.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path / "sub")
    assert git_state()["dirty"] is False
    (tmp_path / "results" / "plan.json").write_text('{"rows": []}')
    assert git_state()["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state()["dirty"] is True
