"""Run docs/own-pool.md as a user would: its ```bash blocks, in order, in an empty folder, with this checkout's
`workbench` on PATH; then copy the comparison's leaderboard and records here and write walkthrough.json (each
block's command and seconds, the commit, the machine). Usage: python results/compare/own-pool/walkthrough.py [DIR]"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def blocks(page: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="own-pool-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: the walkthrough starts from an empty folder")
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    # `workbench` and `python`: this interpreter's (a folder in $WALKTHROUGH_BIN first, e.g. a clean checkout's)
    bins = [p for p in (os.environ.get("WALKTHROUGH_BIN"), str(Path(sys.executable).parent)) if p]
    env = {**os.environ, "PATH": os.pathsep.join([*bins, os.environ["PATH"]]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("WORKBENCH_POOLS", None)
    env.pop("WORKBENCH_RESULTS", None)
    record = {"page": "docs/own-pool.md", "commit": commit, "dirty": dirty, "blocks": [],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    t0 = time.perf_counter()
    for i, block in enumerate(blocks(ROOT / "docs" / "own-pool.md")):
        print(f"--- block {i + 1}\n{block}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env)
        record["blocks"].append({"block": i + 1, "commands": block.strip(), "seconds": round(time.perf_counter() - t, 1),
                                 "exit": proc.returncode})
        if proc.returncode:
            raise SystemExit(f"block {i + 1} failed with exit code {proc.returncode}")
    record["total_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    out = work / "results" / "compare" / "own-pool"
    for old in HERE.iterdir():  # the previous run's records, not this script
        if old.name != Path(__file__).name:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    shutil.copytree(out, HERE, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    (HERE / "walkthrough.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"walkthrough: {record['total_minutes']} min; results in {HERE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
