"""Experts' training data: the user's files, a hub dataset, or a built-in suite task, read one way.

A data spec is
    a file         `data/train.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet` (read by the `datasets` library)
    a folder       written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
    a hub id       `org/name` (where a network exists; offline, one line says so)
    a suite task   `suite:<task>` (the built-in task suite's train split: the demo pool's experts)

Each row becomes {"question": prompt, "answer": answer} (the loss is on the answer tokens), from
- two columns: `prompt_field` and `answer_field` (default: the first present of PROMPT_FIELDS / ANSWER_FIELDS),
- a chat column (`messages_field`, default `messages` when there is no prompt column): a list of
  {role, content} whose last message is the assistant's answer, the others rendered by the tokenizer's chat
  template with the generation prompt,
- a text column (`text_field`): plain text, the loss on all of it (a corpus for perplexity experts).

What an expert learned is recorded in its pool's manifest as `DataRecord`s (spec, fields, content hash, rows).
Methods that need an expert's data (routers, gates, mixtures, upcycled MoEs) read it back through
`read_rows(record)`, which refuses, in one line, data whose content changed since it was recorded; the recorded
hashes are part of those methods' artifact keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field

from .errors import WorkbenchError, did_you_mean
from .io import sha256_file_cached

SUITE_PREFIX = "suite:"
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
PROMPT_FIELDS = ("prompt", "question", "input", "instruction", "query")
ANSWER_FIELDS = ("answer", "completion", "response", "output", "target")
MESSAGES_FIELD = "messages"
MAX_ROWS = 5_000_000  # rows read from one dataset (the demo's tasks have 1,000)
MAX_FIELD_NAME = 128
MAX_TEXT = 1_000_000  # characters in one prompt, answer or text (a row longer than this is malformed)

Format = Literal["suite", "json", "csv", "parquet", "disk", "hub"]


class DataError(WorkbenchError):
    """Training data that cannot be read, or is not what its record says."""


FieldName = Field(None, min_length=1, max_length=MAX_FIELD_NAME)


class DataRecord(Schema):
    """One dataset an expert learned, as its pool's manifest records it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(max_length=200, description="a label: the suite task, or the file's stem")
    source: str = Field(max_length=4096, description="suite:<task>, a path (relative: to the pool's folder), a hub id")
    format: Format
    split: str = Field("train", max_length=64)
    prompt_field: str | None = FieldName
    answer_field: str | None = FieldName
    messages_field: str | None = FieldName
    text_field: str | None = FieldName
    sha256: str = Field(max_length=128, description="the content's hash (file bytes; a hub dataset's fingerprint)")
    rows: int = Field(ge=1, le=MAX_ROWS)

    @property
    def identity(self) -> str:
        """What the rows read from this record depend on: the content's hash, the split and the fields (one file
        read with other fields is other data; the same content moved elsewhere is the same)."""
        from .io import sha256_json

        return sha256_json(self.model_dump(mode="json", exclude={"name", "source", "rows"}))[:16]

    def describe(self) -> str:
        """One line: source, fields and size."""
        if self.messages_field:
            fields = f"chat column {self.messages_field!r}"
        elif self.text_field:
            fields = f"text column {self.text_field!r}"
        else:
            fields = f"{self.prompt_field!r} -> {self.answer_field!r}"
        return f"{self.source} ({fields}, {self.rows:,} rows, sha256 {self.sha256[:12]})"


# ----------------------------------------------------------------------------- locating


def _suite_file(task: str, split: str = "train") -> Path:
    """`task` or `task@seed` (a suite written with another seed) -> its split's JSONL file."""
    from .tasks.suite import DEFAULT_SEED, DOMAINS, TASKS, generate_suite

    task, _, seed = task.partition("@")
    if task not in TASKS and task not in DOMAINS:
        raise DataError(f"unknown suite task {task!r}{did_you_mean(task, [*TASKS, *DOMAINS])}")
    if seed and not (seed.isdigit() and int(seed) < 2**32):
        raise DataError(f"suite seed {seed!r} is not an integer in 0..2**32-1")
    return generate_suite(int(seed) if seed else DEFAULT_SEED) / task / f"{split}.jsonl"


def suite_spec(task: str, seed: int | None = None) -> str:
    """The data spec of a suite task's data (`suite:<task>`, `suite:<task>@<seed>` for another suite seed)."""
    from .tasks.suite import DEFAULT_SEED

    return SUITE_PREFIX + task + (f"@{seed}" if seed is not None and seed != DEFAULT_SEED else "")


def _kind(spec: str) -> tuple[Format, Path | None]:
    """The spec's format and local path (None for a hub id or a suite task)."""
    if spec.startswith(SUITE_PREFIX):
        return "suite", None
    path = Path(spec).expanduser()
    if path.is_dir():
        if any((path / n).is_file() for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return "disk", path
        raise DataError(f"data folder {spec} was not written by datasets' save_to_disk (no dataset_info.json or "
                        "dataset_dict.json): give a JSONL, CSV or Parquet file")
    suffix = path.suffix.lower()
    if suffix in FILE_FORMATS:
        if not path.is_file():
            raise DataError(f"data file {spec} does not exist")
        return FILE_FORMATS[suffix], path  # type: ignore[return-value]
    if path.exists():
        raise DataError(f"data file {spec}: unknown format {suffix or '(no suffix)'!r}; use "
                        f"{', '.join(sorted(FILE_FORMATS))}, a save_to_disk folder or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:  # a path that is not there, not org/name
        raise DataError(f"data {spec!r} is not a file, a save_to_disk folder, a hub id (org/name) or suite:<task>")
    return "hub", None


def _stored_source(spec: str, fmt: Format, path: Path | None, pool_root: Path | None) -> str:
    """What the record keeps: a path inside the pool's project folder (the folder holding the pools folder, e.g.
    `data/x.jsonl` beside `adapters/<pool>/`) relative to the pool's folder (`../../data/x.jsonl`), so the project
    moves as one; other paths absolute."""
    if path is None:
        return spec
    path = path.resolve()
    if pool_root is not None:
        root = Path(pool_root).resolve()
        for top in (root, root.parent.parent):
            try:
                path.relative_to(top)
            except ValueError:
                continue
            return Path(os.path.relpath(path, root)).as_posix()
    return str(path)


def _local_path(record: DataRecord, pool_root: Path | None) -> Path | None:
    if record.format in ("suite", "hub"):
        return None
    p = Path(record.source)
    return p if p.is_absolute() or pool_root is None else Path(pool_root) / p


def _offline() -> bool:
    return any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# ----------------------------------------------------------------------------- hashing


def content_sha256(record_or_spec: DataRecord | str, pool_root: Path | None = None) -> str:
    """The hash of a dataset's content as it is now: the file's bytes, a save_to_disk folder's files, the suite
    task's train file, or a hub dataset's fingerprint (which loads it)."""
    import hashlib

    if isinstance(record_or_spec, DataRecord):
        fmt, path, source = record_or_spec.format, _local_path(record_or_spec, pool_root), record_or_spec.source
        split = record_or_spec.split
    else:
        fmt, path = _kind(record_or_spec)
        source, split = record_or_spec, "train"
    if fmt == "suite":
        return sha256_file_cached(_suite_file(source[len(SUITE_PREFIX):], split))
    if fmt == "hub":
        return _load_hub(source, split)._fingerprint
    assert path is not None
    if not path.exists():
        raise DataError(f"data {path} does not exist")
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file_cached(f).encode())
        return h.hexdigest()
    return sha256_file_cached(path)


# ----------------------------------------------------------------------------- loading


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _load_hub(spec: str, split: str):
    """The split of a hub dataset (offline: from the local `datasets` cache), or None when it has no such split."""
    from datasets import get_dataset_split_names, load_dataset

    try:
        if split != "train" and split not in get_dataset_split_names(spec):
            return None
        return load_dataset(spec, split=split)
    except Exception as e:  # noqa: BLE001 - the hub's errors are many; one line
        if _offline():
            raise DataError(f"data {spec!r} is a hub id that is not in the local datasets cache, and this machine is "
                            "offline (HF_HUB_OFFLINE): download it where a network exists (Dataset.save_to_disk) and "
                            "give the folder, or give a JSONL/CSV/Parquet file") from None
        if "Unknown split" in str(e) or "Bad split" in str(e):
            return None
        raise DataError(f"data {spec!r}: cannot load it from the hub: {_one_line(e)}") from None


def _load(fmt: Format, spec: str, path: Path | None, split: str):
    """A `datasets.Dataset` of the split, or None when the source has no such split (files have only `train`)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if fmt == "suite":
        task = spec[len(SUITE_PREFIX):]
        f = _suite_file(task, split)
        return datasets.load_dataset("json", data_files=str(f), split="train") if f.is_file() else None
    if fmt == "hub":
        return _load_hub(spec, split)
    assert path is not None
    try:
        if fmt == "disk":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                return ds[split] if split in ds else None
            return ds if split == "train" else None
        if split != "train":
            return None
        if path.stat().st_size == 0:
            raise DataError(f"data file {spec} is empty (0 rows)")
        kwargs: dict[str, Any] = {}
        if fmt == "csv":  # every column as text, as written: "042" stays "042", True and NA stay words
            import csv

            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f, delimiter=sep), [])
            kwargs = {"delimiter": sep, "keep_default_na": False, "na_filter": False,
                      "features": datasets.Features({c: datasets.Value("string") for c in header})}
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow, json and csv errors: one line naming the file
        if "corresponds to no data" in str(e):  # a header and no rows: datasets finds no split
            raise DataError(f"data {spec} is empty (0 rows)") from None
        raise DataError(f"data {spec}: cannot read it as {fmt}: {_one_line(e)}") from None


def _pick(columns: list[str], given: str | None, defaults: tuple[str, ...], what: str, flag: str, spec: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"data {spec} has no {what} field {given!r}{did_you_mean(given, columns)}; "
                            f"its columns: {', '.join(columns[:20])}")
        return given
    for name in defaults:
        if name in columns:
            return name
    raise DataError(f"data {spec} has no {what} field (looked for {', '.join(defaults)}); its columns: "
                    f"{', '.join(columns[:20])}: name one with {flag}")


def _text(value: Any, spec: str, i: int, field: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # an integer reads back as written
    if isinstance(value, float):  # 1.50 and 1.5, 7 and 7.0 are one number: the text meant is not known
        raise DataError(f"data {spec} row {i}: field {field!r} is the number {value!r}, not text: quote it in the "
                        "file (\"1.50\") so that it trains as written")
    if not isinstance(value, str):
        raise DataError(f"data {spec} row {i}: field {field!r} is {type(value).__name__}, not text")
    if len(value) > MAX_TEXT:
        raise DataError(f"data {spec} row {i}: field {field!r} has {len(value):,} characters (at most {MAX_TEXT:,})")
    return value


def _chat_row(value: Any, spec: str, i: int, field: str, tokenizer) -> dict[str, Any]:
    ok = isinstance(value, list) and len(value) >= 2 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        got = type(value).__name__ if not isinstance(value, list) else f"a list of {len(value)} items"
        raise DataError(f"data {spec} row {i}: column {field!r} is not a list of at least two {{role, content}} "
                        f"messages (got {got})")
    if value[-1]["role"] != "assistant":
        raise DataError(f"data {spec} row {i}: the last message of column {field!r} is {value[-1]['role']!r}, not "
                        "'assistant' (the answer trained on)")
    if tokenizer is None:
        raise DataError(f"data {spec}: a chat column needs the base's tokenizer to render")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data {spec}: column {field!r} holds chats, and the base's tokenizer has no chat template: "
                        "give --prompt-field and --answer-field instead")
    msgs = [{"role": m["role"], "content": m["content"]} for m in value]
    try:
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template's raise_exception (e.g. "roles must alternate"): one line
        raise DataError(f"data {spec} row {i}: the base's chat template refuses column {field!r}: {_one_line(e)}") from None
    return {"question": prompt, "answer": _text(msgs[-1]["content"], spec, i, field), "delimiter": ""}


def _rows(ds, spec: str, *, prompt_field, answer_field, messages_field, text_field, tokenizer
          ) -> tuple[list[dict[str, Any]], dict[str, str | None]]:
    columns = list(ds.column_names)
    if len(ds) > MAX_ROWS:
        raise DataError(f"data {spec} has {len(ds):,} rows (at most {MAX_ROWS:,})")
    chosen: dict[str, str | None] = {"prompt_field": None, "answer_field": None, "messages_field": None,
                                     "text_field": None}
    given = [n for n, v in (("--text-field", text_field), ("--messages-field", messages_field)) if v]
    if len(given) > 1 or (given and (prompt_field or answer_field)):
        raise DataError("give one of --prompt-field/--answer-field, --messages-field or --text-field")
    auto_text = (prompt_field is None and answer_field is None and messages_field is None and "text" in columns
                 and not any(c in columns for c in PROMPT_FIELDS) and MESSAGES_FIELD not in columns)
    if text_field or auto_text:
        f = _pick(columns, text_field or "text", (), "text", "--text-field", spec)
        chosen["text_field"] = f
        rows = [{"question": "", "answer": _text(r[f], spec, i, f), "delimiter": ""} for i, r in enumerate(ds)]
    elif messages_field or (prompt_field is None and MESSAGES_FIELD in columns
                            and not any(c in columns for c in PROMPT_FIELDS)):
        f = _pick(columns, messages_field or MESSAGES_FIELD, (), "chat", "--messages-field", spec)
        chosen["messages_field"] = f
        rows = [_chat_row(r[f], spec, i, f, tokenizer) for i, r in enumerate(ds)]
    else:
        p = _pick(columns, prompt_field, PROMPT_FIELDS, "prompt", "--prompt-field", spec)
        a = _pick(columns, answer_field, ANSWER_FIELDS, "answer", "--answer-field", spec)
        chosen["prompt_field"], chosen["answer_field"] = p, a
        rows = [{"question": _text(r[p], spec, i, p), "answer": _text(r[a], spec, i, a)} for i, r in enumerate(ds)]
    return rows, chosen


def open_data(spec: str, *, prompt_field: str | None = None, answer_field: str | None = None,
              messages_field: str | None = None, text_field: str | None = None, tokenizer=None,
              pool_root: Path | None = None, name: str | None = None) -> tuple[DataRecord, list[dict[str, Any]]]:
    """Read a data spec's train split into rows and the record that remembers it. Raises DataError in one line:
    a missing file or field, an empty dataset, a chat column that is not a list of messages, a hub id offline."""
    spec = str(spec).strip()
    if not spec:
        raise DataError("empty data spec")
    fmt, path = _kind(spec)
    ds = _load(fmt, spec, path, "train")
    if ds is None and fmt == "hub":
        raise DataError(f"data {spec!r} has no train split")
    if ds is None or len(ds) == 0:
        raise DataError(f"data {spec} is empty (0 rows)")
    rows, fields = _rows(ds, spec, prompt_field=prompt_field, answer_field=answer_field,
                         messages_field=messages_field, text_field=text_field, tokenizer=tokenizer)
    label = name or (spec[len(SUITE_PREFIX):].partition("@")[0] if fmt == "suite" else Path(spec).stem if path else spec.split("/")[-1])
    record = DataRecord(name=label[:200], source=_stored_source(spec, fmt, path, pool_root), format=fmt,
                        sha256=ds._fingerprint if fmt == "hub" else content_sha256(spec),
                        rows=len(rows), **fields)
    return record, rows


def check_unchanged(record: DataRecord, pool_root: Path | None = None, who: str = "") -> None:
    """Refuse (one line) data whose content differs from what was recorded: the expert learned other data."""
    try:
        now = content_sha256(record, pool_root)
    except DataError as e:
        raise DataError(f"{who}: {e}" if who else str(e)) from None
    if now != record.sha256:
        where = f"{who}'s data" if who else "data"
        raise DataError(f"{where} {record.source} changed since it was recorded (sha256 {record.sha256[:12]} -> "
                        f"{now[:12]}): restore it, or record the new data with `workbench pool data`")


def read_rows(record: DataRecord, tokenizer=None, *, split: str | None = None, pool_root: Path | None = None,
              who: str = "", check: bool = True) -> list[dict[str, Any]]:
    """The rows a record names ({"question", "answer"[, "delimiter"]}), after checking its content is unchanged.
    `split`: another split of the same source (e.g. validation): [] when the source has none."""
    split = split or record.split
    if check:
        check_unchanged(record, pool_root, who)
    path = _local_path(record, pool_root)
    ds = _load(record.format, record.source if path is None else str(path), path, split)
    if ds is None:
        return []
    rows, _ = _rows(ds, record.source, prompt_field=record.prompt_field, answer_field=record.answer_field,
                    messages_field=record.messages_field, text_field=record.text_field, tokenizer=tokenizer)
    return rows


def prompt_text(row: dict[str, Any]) -> str:
    """What a model reads of a row before its answer: the prompt, or for plain text (no prompt) the text itself
    (routers that look at inputs, mergekit's positive prompts)."""
    return row["question"] or row["answer"]


def suite_record(task: str, seed: int | None = None) -> DataRecord:
    """The record of a suite task's train split (what `--task <name>` trains on)."""
    rec, _ = open_data(suite_spec(task, seed))
    return rec


__all__ = [
    "ANSWER_FIELDS",
    "PROMPT_FIELDS",
    "SUITE_PREFIX",
    "DataError",
    "DataRecord",
    "check_unchanged",
    "content_sha256",
    "open_data",
    "read_rows",
    "suite_record",
    "suite_spec",
]
