"""The results record: what `run_eval` writes under results/lm-eval/<model>/, and how it is read back.

Per run `<run_id>`: `results_<run_id>.json` (lm-eval's results), `samples_<run_id>.jsonl.gz` (one row per
example and lm-eval filter: task, doc_id, filter, question, target, response, metrics) and the manifest
`run_<run_id>.json`.
The JSON files are scrubbed of the writing machine's absolute paths (`scrub`); the sample rows are data
(prompts, targets, outputs) and are kept verbatim. A rerun with a run's settings replaces it
(`replace_older_runs`); `migrate` brings folders written before this layout to it.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError
from ..io import atomic_write_bytes, atomic_write_json, cache_dir

DROPPED_KEYS = ("pretty_env_info",)  # lm-eval's dump of the machine (the manifest keeps a short `machine`)
_CHECKOUT = Path(__file__).resolve().parents[2]
_LEGACY_SAMPLES = re.compile(r"samples_(?P<task>.+)_(?P<run_id>\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d(?:\.\d+)?)\.jsonl")


def default_roots() -> dict[str, str]:
    """This machine's folders -> portable names, most specific first: the cache -> `$WORKBENCH_CACHE`, the
    checkout -> relative, home -> `~`, the temp folder -> `$TMPDIR`."""
    checkout = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()
    roots: dict[str, str] = {}
    for path, name in [(cache_dir(), "$WORKBENCH_CACHE"), (checkout, ""), (Path.home(), "~"),
                       (Path(tempfile.gettempdir()), "$TMPDIR")]:
        for p in (str(path.expanduser().absolute()), str(path.expanduser().resolve())):
            if p.rstrip("/"):
                roots.setdefault(p.rstrip("/"), name)
    return dict(sorted(roots.items(), key=lambda kv: -len(kv[0])))


def scrub(obj: Any, roots: dict[str, str] | None = None, drop: tuple[str, ...] = DROPPED_KEYS) -> Any:
    """A copy of the JSON-like `obj` with absolute paths under `roots` rewritten and `drop` keys removed."""
    roots = default_roots() if roots is None else roots
    if not roots:
        pattern = None
    else:  # a root starts a path (nothing path-like before it) and ends at "/" or a non-path character
        alts = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w.~$/-])({alts})(/|(?![\w.-]))")

    def text(s: str) -> str:
        if pattern is None:
            return s

        def sub(m: re.Match) -> str:
            name = roots[m.group(1)]
            return (name + m.group(2)) if name else ("" if m.group(2) else ".")

        return pattern.sub(sub, s)

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {text(k) if isinstance(k, str) else k: walk(v) for k, v in x.items() if k not in drop}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return text(x) if isinstance(x, str) else x

    return walk(obj)


def suite_task(lm_eval_name: str) -> str:
    """`wb_addition` / `wb_addition_val` -> `addition` (other names unchanged)."""
    return lm_eval_name.removeprefix("wb_").removesuffix("_val") if lm_eval_name.startswith("wb_") else lm_eval_name


def _requests(args: Any) -> list[tuple]:
    """A sample's request arguments as tuples, from memory (a list of tuples: (context, generation kwargs),
    (context, continuation) per choice, (text,) for rolling perplexity) or from lm-eval's samples file (a mapping
    {"gen_args_<i>": {"arg_<j>": ...}})."""
    if isinstance(args, dict):
        rows = [args[f"gen_args_{i}"] for i in range(len(args)) if isinstance(args.get(f"gen_args_{i}"), dict)]
        return [tuple(r[f"arg_{j}"] for j in range(len(r)) if f"arg_{j}" in r) for r in rows]
    return [tuple(a) if isinstance(a, (list, tuple)) else (a,) for a in args or []]


def _scored(resps: list[Any]) -> bool:
    """Log-likelihood responses: one (loglikelihood, is_greedy) pair per continuation (strings in a samples file)."""
    return bool(resps) and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resps)


def compact_sample(task: str, s: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval sample (in memory, or a line of its samples jsonl) -> the row the record keeps.

    Every output type: generate_until (response: the filtered generation), multiple_choice (response: the choice
    of highest log-likelihood, target: the gold choice's text), loglikelihood (response: the log-likelihood) and
    loglikelihood_rolling (question: the text scored, response: its log-likelihood). `filter`: the lm-eval filter the
    response and metrics are of (a task with several filters has one row per document and filter; rows written
    before it was kept have none: their task had one filter, see `metrics.filter_rows`).
    """
    reqs = _requests(s.get("arguments"))
    prompt = reqs[0][0] if reqs and reqs[0] else None
    resps = s.get("filtered_resps") or [None]
    resp, target = resps[0], s.get("target")
    if _scored(resps):
        lls = [float(r[0]) for r in resps]
        if len(lls) > 1 and len(reqs) == len(lls) and all(len(q) > 1 for q in reqs):  # one request per choice
            choices = [str(q[1]).strip() for q in reqs]
            resp = choices[max(range(len(lls)), key=lls.__getitem__)]
            gold = int(target) if isinstance(target, int) or (isinstance(target, str) and target.isdigit()) else None
            target = choices[gold] if gold is not None and 0 <= gold < len(choices) else target
        else:
            resp = str(lls[0])
    metrics = json.loads(json.dumps({m: s[m] for m in s.get("metrics", []) if m in s},
                                    default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    flt = s.get("filter")  # lm-eval logs one sample per (document, filter): which filter's response and metrics
    return {"task": task, "doc_id": s["doc_id"], **({"filter": flt} if isinstance(flt, str) else {}),
            "question": prompt, "target": target,
            "response": resp if resp is None or isinstance(resp, str) else str(resp), "metrics": metrics}


def write_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows (sorted by task, doc_id; a document's filters kept in lm-eval's order) as gzip JSONL, byte-identical for
    equal rows, written atomically."""
    rows = sorted(rows, key=lambda r: (r["task"], r["doc_id"]))
    data = gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(), mtime=0)
    atomic_write_bytes(Path(path), data)


def read_samples(source: dict[str, Any] | str | Path) -> list[dict[str, Any]]:
    """Per-example rows of one run (a manifest from `results.iter_runs`, or its `run_*.json`), or of every run
    in a model folder; each row gets its `run_id`."""
    if isinstance(source, dict):
        if "_path" not in source:
            raise WorkbenchError("read_samples needs a manifest read from disk (with _path) or a run_*.json path")
        source = source["_path"]
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("samples_*.jsonl.gz"))
    elif path.is_file() and path.name.startswith("run_") and path.suffix == ".json":
        files = [path.with_name(f"samples_{path.stem[4:]}.jsonl.gz")]
        if not files[0].is_file():
            raise WorkbenchError(f"run {path.stem[4:]} has no per-sample file {files[0].name} "
                                 "(evaluated without samples, or not migrated: see record.migrate)")
    else:
        raise WorkbenchError(f"{path} is neither a run manifest (run_*.json) nor a results folder")
    rows = []
    for f in files:
        run_id = f.name.removeprefix("samples_").removesuffix(".jsonl.gz")
        rows += [json.loads(line) | {"run_id": run_id} for line in _gunzip_bounded(f).splitlines()]
    return rows


MAX_SAMPLES_BYTES = 256 * 2**20  # a run's per-sample file decompresses to a few MB; more is a bomb or a mistake


def _gunzip_bounded(path: Path, limit: int = MAX_SAMPLES_BYTES) -> bytes:
    """A .gz file's content, refused in one line past `limit` decompressed bytes (read in chunks: never more)."""
    out = bytearray()
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            out += chunk
            if len(out) > limit:
                raise WorkbenchError(f"{Path(path).name}: decompresses to more than {limit >> 20} MiB: not read")
    return bytes(out)


def run_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same experiment: a rerun with equal settings replaces the older run."""
    return {"model": manifest.get("model"), "model_name": manifest.get("model_name"),
            "tasks": sorted(manifest.get("tasks") or []), "limit": manifest.get("limit"),
            "split": manifest.get("split", "test"), "batch_size": manifest.get("batch_size"),
            "params": manifest.get("params") or {}, "data_sha256": manifest.get("data_sha256") or {},
            "apply_chat_template": bool(manifest.get("apply_chat_template")),
            # a run without per-example outputs never replaces one that has them (pairwise diffs need them)
            "samples": manifest.get("samples_logged", True)}


def run_files(folder: Path, run_id: str) -> list[Path]:
    """A run's data files (results, samples in either layout), without its manifest."""
    return [folder / f"results_{run_id}.json", folder / f"samples_{run_id}.jsonl.gz",
            *folder.glob(f"samples_*_{run_id}.jsonl")]


def replace_older_runs(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Delete earlier runs in `folder` with `manifest`'s settings; call once the new run is fully written.

    Only runs older than this one go, so concurrent reruns never delete a newer run. A manifest that cannot be read
    (`cells.read_record`: over its size or depth caps, not JSON, not an object) is left alone.
    """
    from ..cells import read_record  # bounded: a huge or 100,000-deep file is skipped, never a RecursionError

    want, removed = run_settings(manifest), []
    for p in sorted(Path(folder).glob("run_*.json")):
        run_id = p.stem[4:]
        if run_id >= manifest["run_id"]:
            continue
        old = read_record(p)
        try:
            same = old is not None and run_settings(old) == want
        except TypeError:  # a manifest with malformed fields (tasks not a list of names): not ours to delete
            same = False
        if not same:
            continue
        p.unlink(missing_ok=True)  # the manifest first: a crash leaves orphan files, never a run without them
        for f in run_files(Path(folder), run_id):
            f.unlink(missing_ok=True)
        removed.append(run_id)
    return removed


def migrate(lm_eval_dir: Path, roots: dict[str, str] | None = None) -> dict[str, int]:
    """Bring a results/lm-eval folder written before this layout to it, in place.

    Each run's lm-eval `samples_<task>_<run_id>.jsonl` become `samples_<run_id>.jsonl.gz` (then deleted) and
    every JSON file is scrubbed; files with nothing to change are left as they are, so a second run is a no-op.
    """
    root = Path(lm_eval_dir)
    if not root.is_dir():
        raise WorkbenchError(f"{root} is not a results folder")
    roots = default_roots() if roots is None else roots
    done = {"runs_compacted": 0, "jsonl_removed": 0, "json_scrubbed": 0}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        legacy: dict[str, list[tuple[str, Path]]] = defaultdict(list)
        for f in folder.glob("samples_*.jsonl"):
            if m := _LEGACY_SAMPLES.fullmatch(f.name):
                legacy[m["run_id"]].append((suite_task(m["task"]), f))
        for run_id, files in sorted(legacy.items()):
            rows = [compact_sample(task, json.loads(line))
                    for task, f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            write_samples(folder / f"samples_{run_id}.jsonl.gz", rows)
            for _, f in files:
                f.unlink()
            done["runs_compacted"] += 1
            done["jsonl_removed"] += len(files)
        for f in sorted(folder.glob("*.json")):
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue  # a foreign or broken file is left alone
            clean = scrub(obj, roots)
            if clean != obj:
                atomic_write_json(f, clean)
                done["json_scrubbed"] += 1
    return done
