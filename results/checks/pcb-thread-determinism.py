"""PCB built in fresh processes on 1 and 2 threads, N times, on the wide tiny base of
tests/test_trust.py::test_every_method_builds_the_same_bytes_in_fresh_processes_with_other_thread_counts: how often do
the bytes differ? (issue 26: PCB gave other bytes once, in a CI run at ee8ea1e; it is that test's one expected
failure). Usage: OMP_NUM_THREADS=1 python results/checks/pcb-thread-determinism.py N > pcb-thread-determinism.json
(progress on stderr)."""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
root = Path(tempfile.mkdtemp(prefix="pcbloop-"))
os.environ["WORKBENCH_POOLS"] = str(root / "adapters")
os.environ["WORKBENCH_CACHE"] = str(root / "cache")
from conftest import suite_data  # noqa: E402 (after the tests folder and the isolated folders are set)
from workbench.pool import Pool  # noqa: E402
from workbench.testing import make_tiny_base, make_tiny_lora  # noqa: E402
base = make_tiny_base(root / "wide", seed=0, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                      num_key_value_heads=8, num_hidden_layers=1)
pool = Pool.create("w", base=str(base))
for i, (t, mods) in enumerate((("addition", ("q_proj", "down_proj")), ("sorting", ("q_proj", "v_proj")))):
    pool.add(make_tiny_lora(base, root / f"l{i}", seed=i + 1, r=8, target_modules=mods), t, data=suite_data(t))
code = ("import hashlib, json, sys\nfrom pathlib import Path\nfrom workbench.recipes import build, parse_recipe\n"
        "art = build(parse_recipe({'name': 'pcb', 'pool': 'w', 'method': 'pcb', 'experts': ['addition', 'sorting'],"
        " 'parameters': {'ratio': 0.2}}), log=lambda *a: None)\n"
        "print(json.dumps({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(art).rglob('*.safetensors'))}))\n")
n = int(sys.argv[1])
seen, differ = {}, 0
for k in range(n):
    got = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "WORKBENCH_CACHE_ARTIFACTS": str(root / f"arts-{k}-{threads}")}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        h = hashlib.sha256(out.stdout.strip().splitlines()[-1].encode()).hexdigest()[:12]
        got.append(h)
        seen[h] = seen.get(h, 0) + 1
    differ += got[0] != got[1]
    print(k, got, file=sys.stderr, flush=True)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=Path(__file__).parent).stdout.strip()
print(json.dumps({"commit": commit, "pairs": n, "pairs_differing": differ, "distinct_outputs": seen}, indent=1))
