"""Task names -> lm-eval tasks: the built-in suite, lm-eval's own registry and folders of the user's task YAMLs.

`resolve(names, include_path)` turns what a user types into one `TaskRef` per task (one cell of a comparison):

- suite names and groups (`addition`, `held_in`, `held_out`, `skills`, `domains`, `all`): the lm-eval tasks
  `wb_<name>` (`wb_<name>_val` on the validation split), reported under the plain name;
- names of the include path's task YAMLs (`include_path`: folders, as lm-eval's `--include_path`), then of lm-eval's
  own registry (indexed once per process, and only for a name that is not a suite name: indexing costs seconds).
  A group or tag expands to its leaf tasks, each leaf one task; a leaf whose group changes its configuration
  (overrides, inline tasks) is evaluated with the configuration the group gives it.

Every check runs before any model or result is touched, each failure one TaskError line: an unknown name (with
"did you mean"), a task YAML lm-eval rejects (its own message, naming the file: include-path tasks are built once,
their local data read), a registry task whose dataset is not in the local datasets cache (evaluation is offline).

`task_key_inputs(ref)` is what a result of the task depends on: for suite tasks the suite's data hash and YAML
hash (unchanged: committed results are keyed by them); for others lm-eval's configuration of the task, without this
machine's paths, the sha256 of the local files it reads (data files, a local dataset, `!function` modules) and the
Hub dataset's path, name and revision.

lm-eval's task index and factory (`lm_eval.tasks._index`, `._factory`, lm-eval 0.4.13+) are used as they are, with
one factory subclass that builds configurations without loading data.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from ..errors import TaskError, did_you_mean
from ..io import sha256_file_cached, sha256_json
from .suite import DEFAULT_SEED, DOMAINS, TASKS, _task_yaml, data_hash

SUITE_GROUPS = ("held_in", "held_out", "skills", "domains", "all")
EVAL_SPLITS = ("test", "validation")  # the splits a task is scored on
# datasets' packaged builders: `dataset_path: json` + `dataset_kwargs.data_files` reads local files, not the Hub
PACKAGED = {"json", "csv", "parquet", "text", "arrow", "pandas", "sql", "webdataset", "imagefolder", "audiofolder",
            "videofolder", "xml", "hdf5", "eval", "pdffolder"}
MAX_MESSAGE = 160  # characters of lm-eval's message an error passes through (the line also names the file)
INCLUDE = "$INCLUDE"  # an include folder, in keys and records
LM_EVAL_TASKS = "$LM_EVAL_TASKS"  # lm-eval's own task folder, in keys


@dataclass(frozen=True)
class TaskRef:
    """One task as the workbench evaluates and keys it."""

    name: str  # shown in results, cells and manifests (suite: the plain name; else lm-eval's task name)
    lm_name: str  # lm-eval's task name (suite: wb_<name>; the validation split's twin is wb_<name>_val)
    source: Literal["suite", "registry", "include"]
    include_path: tuple[str, ...] = ()  # the include folders it was resolved with (absolute)
    group: str | None = None  # the group or tag a user named that expanded to this task
    yaml_path: str | None = None  # its YAML (an inline leaf: its group's)
    parent: str | None = None  # the group whose configuration of this leaf differs from the task's own
    defaults: bool = False  # building it needs lm-eval's own registry (a registry task, or an include group over one)
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)  # lm-eval's, unresolved

    def lm_task(self, split: str = "test") -> str:
        """lm-eval's name of the task on `split` (suite tasks have one task per split)."""
        if self.source == "suite":
            return f"wb_{self.name}" if split == "test" else f"wb_{self.name}_val"
        return self.lm_name

    @property
    def output_type(self) -> str:
        if self.source == "suite":
            return "loglikelihood_rolling" if self.name in DOMAINS else "generate_until"
        return str(self.config.get("output_type") or "generate_until")


# ----------------------------------------------------------------------------- helpers


def _one_line(e: BaseException) -> str:
    """An exception's message on one line, clipped; an empty one named by where lm-eval raised it."""
    import yaml

    msg = " ".join(str(e).split())
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:  # the parser's problem and where (the file is named)
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        msg = f"{type(e).__name__}: {f'{e.context}: ' if e.context else ''}{e.problem}{where}"
    elif not msg:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "lm_eval" in f.filename] or \
            traceback.extract_tb(e.__traceback__)
        where = f" in lm-eval's {frames[-1].name}()" if frames else ""
        hint = f" (does the YAML set {frames[-1].name}?)" if frames and frames[-1].name.startswith("doc_to_") else ""
        msg = f"{type(e).__name__}{where}{hint}"
    elif not isinstance(e, (TaskError, ValueError)):
        msg = f"{type(e).__name__}: {msg}"
    return msg if len(msg) <= MAX_MESSAGE else msg[: MAX_MESSAGE - 3] + "..."


class _Errors(logging.Handler):
    """lm-eval's error log lines, kept: some of its failures say what went wrong only there (an unknown metric)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet():
    """lm-eval's logging (duplicate-name warnings while indexing, config warnings while building, errors) and
    prints held back: the workbench reports problems itself, in one line. Yields lm-eval's error lines."""
    logger = logging.getLogger("lm_eval")
    level, propagate, errors = logger.level, logger.propagate, _Errors()
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    logger.addHandler(errors)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield errors.messages
    finally:
        logger.removeHandler(errors)
        logger.setLevel(level)
        logger.propagate = propagate


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def include_dirs(include_path: str | Path | list[str | Path] | tuple | None) -> tuple[str, ...]:
    """The include folders as absolute paths (each must be a folder)."""
    if include_path is None:
        return ()
    items = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    out: list[str] = []
    for p in items:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise TaskError(f"include path {p}: not a folder (give folders of lm-eval task YAMLs)")
        out.append(str(path.resolve()))
    return tuple(dict.fromkeys(out))


def _under(path: str | None, dirs: tuple[str, ...]) -> bool:
    return bool(path) and any(Path(path).resolve().is_relative_to(d) for d in dirs)


def _check_name(name: str, where: str) -> None:
    if name.startswith("wb_"):
        raise TaskError(f"task {name!r} ({where}): names starting with wb_ are the built-in suite's; rename the task")
    if "/" in name or "\\" in name or name.startswith(".") or not name.strip():
        raise TaskError(f"task {name!r} ({where}): a task name names result files: no '/', '\\' or leading '.'")


# ----------------------------------------------------------------------------- indexes


@lru_cache(maxsize=1)
def _registry_index() -> dict[str, Any]:
    """lm-eval's own tasks, groups and tags (name -> index entry), indexed once per process."""
    from lm_eval.tasks._index import TaskIndex

    with _quiet():
        return TaskIndex.build([_lm_eval_tasks_dir()])


def _include_index(dirs: tuple[str, ...]) -> dict[str, Any]:
    """The include folders' tasks, groups and tags, later folders over earlier ones (as lm-eval's index). lm-eval
    skips a YAML it cannot read; here it is one line naming the file (a YAML without `task` or `group` is a
    template for `include:`, and skipped)."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    index: dict[str, Any] = {}
    for root in dirs:
        part: dict[str, Any] = {}
        for path in TaskIndex._iter_yaml_files(Path(root)):
            try:
                cfg = load_yaml(path, resolve_func=False, recursive=True)
            except Exception as e:  # noqa: BLE001 - any reader error is the file's problem, said in one line
                raise TaskError(f"task file {path}: lm-eval cannot read it: {_one_line(e)}") from None
            try:
                TaskIndex._kind_of(cfg)
            except ValueError:
                continue
            try:
                with _quiet():
                    TaskIndex.process_cfg(cfg, path, part)
            except Exception as e:  # noqa: BLE001
                raise TaskError(f"task file {path}: lm-eval cannot index it: {_one_line(e)}") from None
        for name, entry in part.items():  # evaluated beside the suite, such a task would replace the suite's own
            if name.startswith("wb_"):
                raise TaskError(f"task file {entry.yaml_path or root}: {name!r}: names starting with wb_ are the "
                                "built-in suite's; rename it")
        index.update(part)
    return index


class _Missing(Exception):
    """A group names a task its index does not hold."""


@lru_cache(maxsize=1)
def _stub_classes():
    """lm-eval's TaskFactory, building each task's configuration without its data: groups expand to leaves with
    the configuration the group gives them, exactly as lm-eval builds them, and nothing is downloaded or read."""
    from copy import deepcopy
    from types import SimpleNamespace

    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._factory import TaskFactory
    from lm_eval.tasks._yaml_loader import load_yaml

    class Leaf(ConfigurableTask):  # a Task to lm-eval's Group (isinstance), holding only its configuration
        def __init__(self, cfg: dict[str, Any], entry: Any) -> None:
            self._config = SimpleNamespace(task=cfg["task"])  # what Task.task_name reads
            self.cfg, self.entry = cfg, entry

    class Factory(TaskFactory):
        def __init__(self, resolve_func: bool) -> None:
            super().__init__(meta=None)
            self.resolve_func = resolve_func

        def _load_full_config(self, entry, overrides=None):  # TaskFactory's, with !function resolved on request
            if entry.yaml_path:
                cfg = deepcopy(load_yaml(entry.yaml_path, resolve_func=self.resolve_func))
            elif entry.cfg:
                cfg = deepcopy(entry.cfg)
            else:
                cfg = {"metadata": {"config": "unknown"}}
            if overrides:
                cfg = {**cfg, **overrides}
            meta = cfg.get("metadata", {})
            cfg["metadata"] = (meta if isinstance(meta, dict) else {"_metadata": meta}) | self._meta
            cfg["metadata"]["config_source"] = str(entry.yaml_path) if entry.yaml_path else "inline"
            return cfg

        def _build_task(self, entry, overrides):
            cfg = self._load_full_config(entry, overrides)
            for key in ("tag", "group", "task_list"):
                cfg.pop(key, None)
            return Leaf(cfg, entry)

        def _build_group_members(self, member_list, group_name, overrides, registry):
            children = []
            for item in member_list:  # one at a time through lm-eval's own, but inline tasks built here (no data)
                base = item if isinstance(item, str) else \
                    item.get("task") if isinstance(item, dict) and "group" not in item else None
                if isinstance(base, str) and base not in registry:
                    if isinstance(item, str):
                        raise _Missing(base)
                    item_overrides = {**overrides, **item} if overrides else item
                    cfg = {**item_overrides, "task": f"{group_name}::{base}"}
                    cfg["metadata"] = cfg.get("metadata", {}) | self._meta
                    children.append(Leaf(cfg, None))
                else:
                    children += super()._build_group_members([item], group_name, overrides, registry)
            return children

    return Leaf, Factory


def _expand(name: str, index: dict[str, Any], resolve_func: bool = False) -> list[Any]:
    """The leaves (configurations, no data) of a task, group or tag of `index`."""
    Leaf, Factory = _stub_classes()
    registry = dict(index)  # lm-eval's factory registers names in the index it is given
    with _quiet():
        built = Factory(resolve_func).build(registry[name], overrides=None, registry=registry)
    if isinstance(built, list):
        return built
    if isinstance(built, Leaf):
        return [built]
    return [t for t in built.get_all_tasks() if isinstance(t, Leaf)]


def _expand_checked(name: str, index: dict[str, Any]) -> list[Any]:
    """`_expand`, with what lm-eval raises on the way as one TaskError line naming the file (_Missing passes)."""
    try:
        return _expand(name, index)
    except (_Missing, TaskError):
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval's message, one line
        path = index[name].yaml_path
        raise TaskError(f"task {name!r}{f' ({path})' if path else ''}: lm-eval rejects it: {_one_line(e)}") from None


def _index_for(name: str, inc: dict[str, Any], dirs: tuple[str, ...]) -> tuple[dict[str, Any], list[Any]]:
    """(index, leaves) of `name`: the include folders' index alone when it holds the name and all it names, else
    that index over lm-eval's registry."""
    if name in inc:
        try:
            return inc, _expand_checked(name, inc)
        except _Missing:
            pass
    index = {**_registry_index(), **inc}
    if name not in index:
        choices = [*TASKS, *DOMAINS, *SUITE_GROUPS, *index]
        where = "an lm-eval task, group or tag" + (", nor a task of the include path" if dirs else "")
        raise TaskError(f"unknown task {name!r}{did_you_mean(name, choices)}: not a suite task (or held_in, held_out, "
                        f"skills, domains, all), {where}")
    try:
        return index, _expand_checked(name, index)
    except _Missing as e:
        raise TaskError(f"group {name!r} names {str(e)!r}, which is no task, group or tag lm-eval knows") from None


def _refs_of(name: str, inc: dict[str, Any], dirs: tuple[str, ...]) -> list[TaskRef]:
    index, leaves = _index_for(name, inc, dirs)
    named = index[name]
    defaults = index is not inc
    out = []
    for leaf in leaves:
        lm_name = str(leaf.cfg["task"])
        yaml_path = str(leaf.entry.yaml_path) if leaf.entry is not None and leaf.entry.yaml_path else \
            (str(named.yaml_path) if named.yaml_path else None)
        _check_name(lm_name, yaml_path or name)
        parent = None
        if lm_name != name:  # a group's (or tag's) leaf: does the group configure it otherwise than its own YAML?
            entry = index.get(lm_name)
            own = _expand(lm_name, index)[0].cfg if entry is not None and leaf.entry is not None and \
                entry.kind.name in ("TASK", "PY_TASK") else None
            parent = None if own == leaf.cfg else name
        source = "include" if _under(yaml_path, dirs) else "registry"
        out.append(TaskRef(lm_name, lm_name, source, dirs, None if lm_name == name else name, yaml_path, parent,
                           defaults or source == "registry", leaf.cfg))
    return out


def _suite_names(name: str) -> list[str] | None:
    if name in ("held_in", "held_out"):
        return [n for n, t in TASKS.items() if t.kind == name]
    if name == "skills":
        return list(TASKS)
    if name == "domains":
        return list(DOMAINS)
    if name == "all":
        return list(TASKS) + list(DOMAINS)
    if name in TASKS or name in DOMAINS:
        return [name]
    return None


# ----------------------------------------------------------------------------- resolution


def resolve(names: list[str | TaskRef] | tuple, include_path=None, split: str = "test", *,
            validate: bool = True) -> list[TaskRef]:
    """Task names (suite names and groups, include-path and registry tasks, groups and tags; or TaskRefs, kept)
    -> one TaskRef per task, in order, each once.

    `validate` (the default) checks before any work that each task can be evaluated on `split`: include-path tasks
    are built by lm-eval once (their local data read), registry tasks' datasets must be in the local cache.
    """
    if split not in EVAL_SPLITS:
        raise TaskError(f"unknown evaluation split {split!r}; use test or validation")
    if isinstance(names, (str, TaskRef)):
        names = [names]
    dirs = include_dirs(include_path)
    inc: dict[str, Any] | None = None
    refs: list[TaskRef] = []
    for name in names:
        if isinstance(name, TaskRef):
            refs.append(name)
            continue
        if not isinstance(name, str) or not name:
            raise TaskError(f"a task name is a non-empty string (got {str(name)[:40]!r})")
        suite = _suite_names(name)
        if suite is not None:
            refs += [TaskRef(n, f"wb_{n}", "suite") for n in suite]
            continue
        if inc is None:
            inc = _include_index(dirs) if dirs else {}
        refs += _refs_of(name, inc, dirs)
    out: dict[str, TaskRef] = {}
    for r in refs:
        first = out.setdefault(r.name, r)
        if first is not r and (first.source, first.config, first.parent) != (r.source, r.config, r.parent):
            if first.group is not None and first.group == r.group:
                raise TaskError(f"group {r.group!r} makes two tasks named {r.name!r} with different configurations: "
                                "it cannot be evaluated task by task; name its tasks instead")
            ways = [f"through {x.group!r}" if x.group else "by name" for x in (first, r)]
            raise TaskError(f"task {r.name!r} is asked for twice with different configurations ({ways[0]} and "
                            f"{ways[1]}): evaluate them in separate runs")
    if validate:
        check(list(out.values()), split)
    return list(out.values())


def check(refs: list[TaskRef], split: str = "test") -> None:
    """Each task can be evaluated on `split`: one TaskError line for the first that cannot."""
    for r in refs:
        if r.source == "suite":
            continue
        if split == "validation" and not r.config.get("validation_split"):
            raise TaskError(f"task {r.name!r} has no validation split (its configuration sets no validation_split): "
                            "it cannot be scored for selection")
        if (ds := hub_dataset(r.config)) is not None and not dataset_cached(ds):
            raise TaskError(offline_message(r, ds))
        if r.source == "include":
            _validated(r, split)


def offline_message(ref: TaskRef, dataset: str) -> str:
    return (f"task {ref.name!r}: its dataset {dataset} is not in the local datasets cache and this machine is offline "
            "(evaluation never downloads: load it once where there is a network and copy the Hugging Face cache)")


def hub_dataset(cfg: dict[str, Any]) -> str | None:
    """The Hub dataset a task's configuration reads (None: local files, a packaged builder, custom code)."""
    if "class" in cfg or cfg.get("custom_dataset"):
        return None
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path or path in PACKAGED or Path(path).expanduser().exists():
        return None
    return path


def dataset_cached(path: str) -> bool:
    """Whether `path` (a Hub dataset id) is in the Hub cache or the datasets cache (a cheap look: no download)."""
    import datasets.config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
    folder = Path(datasets.config.HF_DATASETS_CACHE)
    want = {path.replace("/", "___").lower(), path.rsplit("/", 1)[-1].lower()}
    local = folder.is_dir() and any(p.name.lower() in want for p in folder.iterdir() if p.is_dir())
    return hub.is_dir() or local


_VALIDATED: set[str] = set()


def _validated(ref: TaskRef, split: str) -> None:
    """An include-path task built once by lm-eval (its data read): what lm-eval rejects is one line naming the file.
    Remembered per process by the task's key inputs: an edit of its YAML or data builds it again."""
    memo = sha256_json([ref.name, split, ref.parent, task_key_inputs(ref)])
    if memo in _VALIDATED:
        return
    load_task(task_manager([ref]), ref, split)
    _VALIDATED.add(memo)


# ----------------------------------------------------------------------------- building for lm-eval


def task_manager(refs: list[TaskRef], split_seed: int = DEFAULT_SEED):
    """One lm-eval TaskManager that knows every task of `refs`: the suite's folder (suite tasks), the include folders
    and, when a task needs it, lm-eval's registry (its index built once per process)."""
    from lm_eval.tasks import TaskManager

    from .suite import generate_suite

    paths: list[str] = []
    if any(r.source == "suite" for r in refs):
        paths.append(str(generate_suite(split_seed)))
    for r in refs:
        paths += [p for p in r.include_path if p not in paths]
    if not any(r.defaults for r in refs):
        if len(paths) == 1 and all(r.source == "suite" for r in refs):
            return TaskManager(include_path=paths[0], include_defaults=False, verbosity="ERROR")
        with _quiet():
            return TaskManager(include_path=paths or None, include_defaults=False)
    with _quiet():
        tm = TaskManager(include_path=paths or None, include_defaults=False)
    # lm-eval's own tasks under the include folders (as include_defaults=True), from the index built once
    from lm_eval.tasks._index import Kind

    tm._index = {**_registry_index(), **tm._index}
    tm._all_tasks = sorted(tm._index)
    tm._all_subtasks = sorted(k for k, e in tm._index.items() if e.kind in (Kind.TASK, Kind.PY_TASK))
    tm._all_groups = sorted(k for k, e in tm._index.items() if e.kind == Kind.GROUP)
    tm._all_tags = sorted(k for k, e in tm._index.items() if e.kind == Kind.TAG)
    return tm


def _leaf_config(ref: TaskRef, resolve_func: bool) -> dict[str, Any]:
    """The leaf's configuration as its group (or the task itself) gives it; `resolve_func` imports !function code."""
    inc = _include_index(ref.include_path) if ref.include_path else {}
    index = {**_registry_index(), **inc} if ref.defaults else inc
    root = ref.parent or ref.lm_name
    if root not in index:
        raise TaskError(f"task {ref.name!r}: {root!r} is no longer among the tasks lm-eval knows (renamed or removed?)")
    for leaf in _expand(root, index, resolve_func=resolve_func):
        if leaf.cfg["task"] == ref.lm_name:
            return leaf.cfg
    raise TaskError(f"task {ref.name!r} is no longer a task of {root!r} (its YAML changed?)")


def lm_spec(ref: TaskRef, split: str = "test") -> str | dict[str, Any]:
    """What lm-eval's TaskManager.load takes for the task: its name, or its full configuration where its group
    configures it or the validation split is scored."""
    if ref.source == "suite" or (ref.parent is None and split == "test"):
        return ref.lm_task(split)
    cfg = _leaf_config(ref, resolve_func=True)
    return {**cfg, "test_split": None} if split == "validation" else cfg


def load_task(tm, ref: TaskRef, split: str = "test"):
    """The lm-eval Task of `ref` (its data loaded); what lm-eval rejects is one TaskError line."""
    from ..eval.harness import set_offline

    set_offline()  # the workbench never downloads: a dataset not cached fails here, in one line
    logged: list[str] = []
    try:
        spec = lm_spec(ref, split)
        with _quiet() as logged:
            loaded = tm.load([spec])
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval's own message, passed through in one line
        text = " ".join(str(e).split())
        if (ds := hub_dataset(ref.config)) and (isinstance(e, ConnectionError) or "Couldn't reach" in text
                                                or "OfflineModeIsEnabled" in text):
            raise TaskError(offline_message(ref, ds)) from None
        detail = _one_line(e)
        if logged:  # lm-eval logged the reason and raised something vaguer (an unknown metric: KeyError: None)
            detail = _one_line(TaskError(f"{logged[-1]} ({detail})"))
        raise TaskError(f"task {ref.name!r}{f' ({ref.yaml_path})' if ref.yaml_path else ''}: lm-eval rejects it: "
                        f"{detail}") from None
    tasks = loaded["tasks"]
    return tasks.get(ref.lm_name) or next(iter(tasks.values()))


# ----------------------------------------------------------------------------- keys


def suite_config_hash(name: str) -> str:
    """A suite task's lm-eval configuration (prompt, generation settings, filters, metric), without this machine's
    paths: the hash committed cell keys hold."""
    return sha256_json(_task_yaml(name, Path("/suite"), TASKS.get(name) if name not in DOMAINS else None))[:16]


def _portable_roots(dirs: tuple[str, ...]) -> dict[str, str]:
    from ..eval.record import default_roots

    roots = {d: INCLUDE for d in dirs}
    roots[str(_lm_eval_tasks_dir())] = LM_EVAL_TASKS
    for k, v in default_roots().items():
        roots.setdefault(k, v)
    return dict(sorted(roots.items(), key=lambda kv: -len(kv[0])))


def _flat(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _flat(v)]
    return []


def local_files(cfg: dict[str, Any]) -> list[Path]:
    """The local files a task's configuration reads: `dataset_kwargs.data_files` (relative to `data_dir`, else the
    working folder, as datasets reads them; globs expanded) and a local `dataset_path` (a file, or a folder's files)."""
    kwargs = cfg.get("dataset_kwargs") if isinstance(cfg.get("dataset_kwargs"), dict) else {}
    base = Path(kwargs.get("data_dir") or ".").expanduser()
    files: list[Path] = []
    for p in _flat(kwargs.get("data_files")):
        if "://" in p:
            continue
        full = Path(p).expanduser()
        full = full if full.is_absolute() else base / full
        hits = sorted(glob.glob(str(full), recursive=True)) if glob.has_magic(str(full)) else [str(full)]
        files += [Path(h) for h in hits]
    path = cfg.get("dataset_path")
    if isinstance(path, str) and path not in PACKAGED and (local := Path(path).expanduser()).exists():
        files += [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file()
                                                        and not any(part.startswith(".") for part in f.parts))
    return files


def _code_files(obj: Any) -> list[Path]:
    """`!function` modules an unresolved configuration names (`<folder>/<module>.<function>`)."""
    out = []
    for s in _flat(obj):
        if os.path.isabs(s) and "." in Path(s).name:
            module = Path(s.rsplit(".", 1)[0] + ".py")
            if module.is_file():
                out.append(module)
    return out


def task_key_inputs(ref: TaskRef) -> dict[str, str]:
    """{"data": ..., "config": ...}: what a result of the task depends on besides the model and the eval settings.

    Suite tasks: `data_hash(name)` and `suite_config_hash(name)`, as committed keys hold them. Others: lm-eval's
    configuration of the task without this machine's paths (include folders -> $INCLUDE, lm-eval's task folder
    -> $LM_EVAL_TASKS, the cache, checkout, home and temp folders as results name them) with the sha256 of the
    `!function` modules it names; the data: the sha256 of each local file it reads, and the Hub dataset's path,
    name and revision.
    """
    if ref.source == "suite":
        return {"data": data_hash(ref.name), "config": suite_config_hash(ref.name)}
    from ..eval.record import scrub

    roots = _portable_roots(ref.include_path)

    def portable(p: Path | str) -> str:
        return scrub(str(Path(p).resolve()), roots, drop=())

    files = {}
    for f in local_files(ref.config):
        if not f.is_file():
            raise TaskError(f"task {ref.name!r}{f' ({ref.yaml_path})' if ref.yaml_path else ''}: its data file {f} "
                            "does not exist")
        files[portable(f)] = sha256_file_cached(f)
    data: dict[str, Any] = {"files": files}
    if (ds := hub_dataset(ref.config)) is not None:
        kwargs = ref.config.get("dataset_kwargs") if isinstance(ref.config.get("dataset_kwargs"), dict) else {}
        data["dataset"] = {"path": ds, "name": ref.config.get("dataset_name"), "revision": kwargs.get("revision")}
    code = {portable(f): sha256_file_cached(f) for f in _code_files(ref.config)}
    config = scrub(ref.config, roots, drop=())
    return {"data": sha256_json(data)[:16], "config": sha256_json({"config": config, "code": code})[:16]}


__all__ = ["TaskRef", "check", "include_dirs", "lm_spec", "load_task", "resolve", "suite_config_hash",
           "task_key_inputs", "task_manager"]
