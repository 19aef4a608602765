"""Own anonymous memory of a streamed TIES merge of a pool's N LoRAs into a rank-16 LoRA, stopped after the first
`tensors` of its output tensors (by then every per-expert structure the merge keeps is built; the per-tensor
streaming does not depend on N). Samples RssAnon every 10 ms; prints the start, the peak above it, and the level when
the first tensor starts and when the build is stopped. Writes its artifacts to a fresh temporary cache.
Usage (the issue-27 figures: a 1,024-adapter pool, 3 tensors, one thread):
  workbench pool synth /tmp/p1024 --n 1024 --from demo
  OMP_NUM_THREADS=1 python results/checks/ties-memory-probe.py /tmp/p1024 3
Run it from an older checkout (e.g. c239bb7^) for the figure before the compact LoRA layouts."""
import os
import sys
import tempfile
import threading
import time

os.environ["WORKBENCH_CACHE_ARTIFACTS"] = tempfile.mkdtemp(prefix="ties-memory-probe-")

from workbench.methods import merge_ta  # noqa: E402
from workbench.recipes import build, parse_recipe  # noqa: E402


def anon_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    return 0.0


pool, limit = sys.argv[1], int(sys.argv[2])
orig = merge_ta.TaskArithmeticFamily.iter_merged_deltas
marks: dict[str, float] = {}


def limited(self, ctx):
    marks["first tensor"] = anon_mb()
    for k, item in enumerate(orig(self, ctx)):
        if k >= limit:
            break
        yield item
    marks["stopped"] = anon_mb()


merge_ta.TaskArithmeticFamily.iter_merged_deltas = limited
import mergekit.merge_methods  # noqa: E402,F401  (imports out of the count)
import peft  # noqa: E402,F401

peak, done = [0.0], threading.Event()


def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.01)


threading.Thread(target=sample, daemon=True).start()
start = anon_mb()
t0 = time.time()
build(parse_recipe({"name": "ties-memory-probe", "pool": pool, "method": "ties", "parameters": {"density": 0.2},
                    "output": {"kind": "lora", "rank": 16}}), log=lambda *a: None)
done.set()
time.sleep(0.05)
print({"start_mb": round(start), "peak_own_mb": round(peak[0] - start),
       **{f"{k}_own_mb": round(v - start) for k, v in marks.items()}, "wall_s": round(time.time() - t0, 1)})
