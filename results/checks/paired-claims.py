"""Paired tests behind the docs' "beats" claims, from the committed cells (nothing is run): per claim, exact McNemar
over the examples both rows scored (cells/<row>/<task>.json, aligned by doc id, pooled over the claim's tasks),
Holm-corrected within each comparison's family. Cells are read by the workbench's one checked reader
(`workbench.cells`): only cells the comparison's plan.json expects, with its keys, count; a cell from an older commit
(git show) is checked for its place and shape. Usage: python results/checks/paired-claims.py > paired-claims.json"""
import json
import subprocess
import sys
from pathlib import Path

from workbench.cells import ANY_KEY, cell_problem, comparison_cells
from workbench.eval.stats import compare, holm
from workbench.tasks.suite import task_names

ROOT = Path(__file__).resolve().parents[1] / "compare"
HI, HO = task_names("held_in"), task_names("held_out")
STATIC = ["ta-lora", "ties-lora", "dare-lora", "pcb-lora"]
families = {
    # comparison folder: (row a, row b, task group)
    "upcycle": [("bam", "btx", "held_in"), ("bam-shared-kv", "bam", "held_in"), ("btx", "mergekit-moe", "held_in"),
                ("btx", "btx-untrained", "held_in"), ("mergekit-moe", "mergekit-moe-untrained", "held_in")],
    "routing": [(a, s, "held_out") for a in ("phatgoose-lora", "mole-lora") for s in STATIC]
    + [(a, s, "held_in") for a in ("phatgoose-lora", "mole-lora") for s in STATIC]
    + [("smora-lora", "multitask-r64", g) for g in ("held_in", "held_out")]
    + [("smora-lora", "multitask", g) for g in ("held_in", "held_out")]
    + [("mole-lora", "mole-nobalance-lora", g) for g in ("held_in", "held_out")]
    + [("phatgoose-lora", "avg-act-lora", g) for g in ("held_in", "held_out")],
}
# MoLE with 4x the gate budget (merges/mole-long-lora.yaml: 400 steps, 200 examples per expert) against the 100-step
# MoLE and against every static merge: its own family, so that the routing family's p-values stay as they were
MOLE_LONG = ([("mole-long-lora", "mole-lora", g) for g in ("held_in", "held_out")]
             + [("mole-long-lora", s, g) for g in ("held_in", "held_out") for s in STATIC])
# and with 8x (merges/mole-xl-lora.yaml: 800 steps, 400 examples per expert) against the 4x one and every static merge
MOLE_XL = ([("mole-xl-lora", "mole-long-lora", g) for g in ("held_in", "held_out")]
           + [("mole-xl-lora", s, g) for g in ("held_in", "held_out") for s in STATIC])


def _test(pairs: list[tuple[dict, dict]], a: str, b: str, used: list[str]) -> dict | None:
    """McNemar over the examples both cells of each pair scored (by doc id), pooled over the pairs."""
    xs, ys = [], []
    for ca, cb in pairs:
        by_doc = dict(zip(cb["doc_ids"], cb["values"]))
        for d, x in zip(ca["doc_ids"], ca["values"]):
            if d in by_doc:
                xs.append(x)
                ys.append(by_doc[d])
    if not xs:
        return None
    c = compare(xs, ys)
    return {"a": a, "b": b, "n": c["n"], "mean_a": c["mean_a"], "mean_b": c["mean_b"], "diff": c["diff"],
            "a_only": c.get("a_only"), "b_only": c.get("b_only"), "p_value": c["p_value"], "test": c["test"],
            "tasks": used}


_CELLS: dict[Path, dict] = {}


def counted(folder: Path) -> dict:
    """(row, task) -> cell of the comparison in `folder` that counts (`cells.comparison_cells`); the others are named
    on stderr."""
    if folder not in _CELLS:
        got = comparison_cells(folder)
        for path, why in got.skipped:
            print(f"{path}: not counted: {why}", file=sys.stderr)
        _CELLS[folder] = got.cells
    return _CELLS[folder]


def paired(folder: Path, a: str, b: str, tasks: list[str]) -> dict | None:
    pairs, used = [], []
    cells = counted(folder)
    for t in tasks:
        if (a, t) in cells and (b, t) in cells:
            pairs.append((cells[(a, t)], cells[(b, t)]))
            used.append(t)
    return _test(pairs, a, b, used)


# Before / after the fidelity changes (issue 26): each retrained row against its committed cells at f0c8363 (the
# same test examples), one family.
BEFORE = "f0c8363"
before_after = [(r, g) for r in ("phatgoose-lora", "mole-lora", "smora-lora", "twin-lora") for g in ("held_in", "held_out")]


def paired_before(row: str, tasks: list[str], before: str = BEFORE) -> dict | None:
    pairs, used = [], []
    cells = counted(ROOT / "routing")
    for t in tasks:
        old = subprocess.run(["git", "show", f"{before}:results/compare/routing/cells/{row}/{t}.json"],
                             capture_output=True, text=True, cwd=ROOT)
        then = json.loads(old.stdout) if old.returncode == 0 else None
        if (row, t) in cells and then is not None and cell_problem(then, row, t, ANY_KEY, ROOT / "routing") is None:
            pairs.append((cells[(row, t)], then))
            used.append(t)
    return _test(pairs, f"{row} (now)", f"{row} at {before}", used)


commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
out = {"commit": commit, "test": "exact McNemar on the examples both rows scored, pooled over the group's tasks; "
       "Holm within each comparison's family", "families": {}}
for name, claims in families.items():
    tests = []
    for a, b, group in claims:
        got = paired(ROOT / name, a, b, HI if group == "held_in" else HO)
        if got is not None:
            tests.append(got | {"group": group})
    for t, adj in zip(tests, holm([t["p_value"] for t in tests])):
        t["p_holm"] = adj
    out["families"][f"merges/{name}.yaml"] = tests
for family, claims in (("routing: MoLE 4x budget", MOLE_LONG), ("routing: MoLE 8x budget", MOLE_XL)):
    tests = [t | {"group": g} for a, b, g in claims
             if (t := paired(ROOT / "routing", a, b, HI if g == "held_in" else HO))]
    for t, adj in zip(tests, holm([t["p_value"] for t in tests])):
        t["p_holm"] = adj
    # the stricter reading: the same tests Holm-corrected together with the routing family's
    routing = out["families"]["merges/routing.yaml"]
    for t, adj in zip(tests, holm([t["p_value"] for t in tests + routing])):
        t["p_holm_with_routing_family"] = adj
    out["families"][family] = tests
tests = [t | {"group": g} for r, g in before_after if (t := paired_before(r, HI if g == "held_in" else HO))]
for t, adj in zip(tests, holm([t["p_value"] for t in tests])):
    t["p_holm"] = adj
out["families"]["routing: before / after"] = tests
# MoLE's gates at lr 1e-4 (now) against the same recipes at lr 5e-3 (their committed cells at 7465f0e), one family
MOLE_LR = "7465f0e"
tests = [t | {"group": g} for r in ("mole-lora", "mole-nobalance-lora") for g in ("held_in", "held_out")
         if (t := paired_before(r, HI if g == "held_in" else HO, MOLE_LR))]
for t, adj in zip(tests, holm([t["p_value"] for t in tests])):
    t["p_holm"] = adj
out["families"]["routing: MoLE lr 1e-4 / 5e-3"] = tests
print(json.dumps(out, indent=1))
