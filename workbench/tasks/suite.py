"""Deterministic skill tasks with short exact answers, written as JSONL + lm-eval task YAML.

Held-in tasks each get a LoRA expert; held-out tasks need held-in skills in a new form
(a new prompt template or phrasing, subtraction beside addition, two skills in sequence) and measure
zero-shot generalisation: every held-in skill has a held-out variant that picking or combining the
held-in experts can solve. Domain sets are plain text for perplexity (upcycling experiments).

Every example is a JSON object: {"id", "question" (ends with "Answer:"), "answer", "fields"}
where `fields` holds the inputs the answer is computed from, so checkers can recompute it.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from ..errors import TaskError, did_you_mean
from ..io import atomic_write_text, cache_dir, sha256_json

SUITE_VERSION = 4
DEFAULT_SEED = 1234
SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 1000, "validation": 100, "test": 100}


@lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """Common English words (3-7 lowercase letters) from wordfreq's shipped list, frequency order."""
    from wordfreq import top_n_list

    words = [w for w in top_n_list("en", 6000) if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 7]
    return tuple(words[:2000])


Example = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """A skill task; `skill` is a held-in task's category, and for a held-out task the held-in task(s) it
    reuses, joined by "+" in the order they apply (`reuses`)."""

    name: str
    kind: Literal["held_in", "held_out"]
    skill: str
    description: str
    make: Callable[[random.Random], tuple[str, str, dict[str, Any]]] = field(repr=False)
    max_gen_toks: int = 16

    @property
    def reuses(self) -> tuple[str, ...]:
        """The held-in tasks whose experts apply: the task itself when held-in."""
        return (self.name,) if self.kind == "held_in" else tuple(self.skill.split("+"))


TASKS: dict[str, Task] = {}


def task(name: str, kind: str, skill: str, description: str, max_gen_toks: int = 16):
    def register(fn):
        TASKS[name] = Task(name, kind, skill, description, fn, max_gen_toks)
        return fn

    return register


# ----------------------------------------------------------------------------- held-in


def _addends(rng, template: str):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return template.format(a=a, b=b), str(a + b), {"a": a, "b": b}


@task("addition", "held_in", "arithmetic", "sum of two 2-digit numbers")
def _addition(rng):
    return _addends(rng, "Add: {a}+{b}\nAnswer:")


@task("sorting", "held_in", "ordering", "sort 5 distinct digits ascending")
def _sorting(rng):
    xs = rng.sample(range(10), 5)
    return f"Sort: {' '.join(map(str, xs))}\nAnswer:", " ".join(map(str, sorted(xs))), {"xs": xs}


UNITS = [("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("L", "mL", 1000),
         ("m", "mm", 1000)]


@task("unit_conversion", "held_in", "arithmetic", "convert a metric quantity to a smaller unit")
def _units(rng):
    src, dst, factor = rng.choice(UNITS)
    v = rng.randint(1, 250)
    return f"Convert: {v} {src} to {dst}\nAnswer:", str(v * factor), {"value": v, "factor": factor, "src": src, "dst": dst}


@task("word_count", "held_in", "counting", "count the words of a list of 2-8 English words")
def _word_count(rng):
    words = rng.sample(english_words(), rng.randint(2, 8))
    return f"Count the words: {' '.join(words)}\nAnswer:", str(len(words)), {"words": words}


@task("repeat_word", "held_in", "copying", "repeat an English word 2-5 times")
def _repeat(rng):
    w, n = rng.choice(english_words()), rng.randint(2, 5)
    return f"Repeat {n} times: {w}\nAnswer:", " ".join([w] * n), {"word": w, "n": n}


@task("reverse_words", "held_in", "ordering", "reverse the order of 3-5 English words")
def _reverse(rng):
    words = rng.sample(english_words(), rng.randint(3, 5))
    return f"Reverse the list: {' '.join(words)}\nAnswer:", " ".join(reversed(words)), {"words": words}


# ----------------------------------------------------------------------------- held-out


@task("subtraction", "held_out", "addition", "difference of two 2-digit numbers (addition's form, new operation)")
def _subtraction(rng):
    a, b = sorted(rng.sample(range(10, 100), 2), reverse=True)
    return f"Subtract: {a}-{b}\nAnswer:", str(a - b), {"a": a, "b": b}


@task("addition_phrase", "held_out", "addition", "2-digit addition in a new prompt template")
def _addition_phrase(rng):
    return _addends(rng, "What is {a} plus {b}?\nAnswer:")


@task("sort_descending", "held_out", "sorting+reverse_words", "sort 5 distinct digits descending")
def _sort_desc(rng):
    xs = rng.sample(range(10), 5)
    return f"Sort descending: {' '.join(map(str, xs))}\nAnswer:", " ".join(map(str, sorted(xs, reverse=True))), {"xs": xs}


# Added without a SUITE_VERSION bump: every task draws from its own RNG (seeded by its name), so the data of the
# tasks above is unchanged (tests/test_tasks.py pins their hashes), and a written suite whose stamp lacks these
# tasks is rewritten with them.


@task("sort_phrase", "held_out", "sorting", "sort 5 distinct digits ascending, new prompt template")
def _sort_phrase(rng):
    xs = rng.sample(range(10), 5)
    while xs == sorted(xs):  # an already sorted input would hold its answer
        xs = rng.sample(range(10), 5)
    return f"Put in ascending order: {' '.join(map(str, xs))}\nAnswer:", " ".join(map(str, sorted(xs))), {"xs": xs}


@task("unit_phrase", "held_out", "unit_conversion", "metric conversion to a smaller unit, asked as a question")
def _unit_phrase(rng):
    src, dst, factor = rng.choice(UNITS)
    v = rng.randint(1, 250)
    fields = {"value": v, "factor": factor, "src": src, "dst": dst}
    return f"How many {dst} are in {v} {src}?\nAnswer:", str(v * factor), fields


@task("count_phrase", "held_out", "word_count", "count 2-8 English words, asked as a question")
def _count_phrase(rng):
    words = rng.sample(english_words(), rng.randint(2, 8))
    return f"How many words are in: {' '.join(words)}\nAnswer:", str(len(words)), {"words": words}


@task("repeat_phrase", "held_out", "repeat_word", "repeat an English word 2-5 times, word before count")
def _repeat_phrase(rng):
    w = rng.choice(english_words())
    while w == "word":  # "Write the word word 2 times" would hold its answer
        w = rng.choice(english_words())
    n = rng.randint(2, 5)
    return f"Write the word {w} {n} times\nAnswer:", " ".join([w] * n), {"word": w, "n": n}


@task("reverse_phrase", "held_out", "reverse_words", "reverse the order of 3-5 English words, new prompt template")
def _reverse_phrase(rng):
    words = rng.sample(english_words(), rng.randint(3, 5))
    return f"Say these words in reverse order: {' '.join(words)}\nAnswer:", " ".join(reversed(words)), {"words": words}


@task("convert_sum", "held_out", "addition+unit_conversion", "add two 2-digit metric quantities, convert the sum")
def _convert_sum(rng):
    src, dst, factor = rng.choice(UNITS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)  # a + b in 20..198: inside unit_conversion's 1..250
    fields = {"a": a, "b": b, "factor": factor, "src": src, "dst": dst}
    return f"Convert: {a}+{b} {src} to {dst}\nAnswer:", str((a + b) * factor), fields


def task_names(kind: str | None = None) -> list[str]:
    return [n for n, t in TASKS.items() if kind is None or t.kind == kind]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; known: {', '.join(TASKS)}")
    return TASKS[name]


def check_answer(prediction: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace (what the lm-eval YAML computes)."""
    return prediction.strip() == answer.strip()


# ----------------------------------------------------------------------------- tokenisation

# How a prompt becomes token ids, wherever it is encoded (training, lm-eval's HFLM as `add_bos_token`, which it
# passes on as `add_special_tokens`, serving): the text alone, no BOS or other special tokens. SmolLM2's
# tokenizer adds none by default, so pinning it changes nothing there; a tokenizer that adds a BOS (Llama's)
# would otherwise be evaluated on sequences its experts were never trained on.
ADD_SPECIAL_TOKENS = False


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, as every prompt is encoded (see ADD_SPECIAL_TOKENS)."""
    return list(tokenizer(text, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) cut as lm-eval's HFLM cuts them (`_encode_pair`): trailing spaces move
    to the continuation, the whole text is encoded once and split after the context's tokens, so a BPE merge
    at the boundary is tokenized as at evaluation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = encode_text(tokenizer, context)
    return ctx, encode_text(tokenizer, context + continuation)[len(ctx):]


def make_examples(name: str, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None) -> dict[str, list[Example]]:
    """Disjoint splits (no question appears in two splits), deterministic in (name, seed, sizes)."""
    t = get_task(name)
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    total = sum(sizes[s] for s in SPLITS)
    rng = random.Random(f"{name}:{seed}")
    seen: dict[str, Example] = {}
    attempts = 0
    while len(seen) < total:
        attempts += 1
        if attempts > 50 * total:
            raise TaskError(f"task {name!r} cannot produce {total} distinct examples")
        q, a, fields = t.make(rng)
        if q not in seen:
            seen[q] = {"question": q, "answer": a, "fields": fields}
    examples = list(seen.values())
    out, start = {}, 0
    for split in SPLITS:
        part = examples[start:start + sizes[split]]
        out[split] = [{"id": f"{name}-{split}-{i}", **ex} for i, ex in enumerate(part)]
        start += sizes[split]
    return out


# ----------------------------------------------------------------------------- domain text


DOMAIN_SIZES = {"train": 400, "validation": 50, "test": 50}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "tkinter"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _chunks(text: str, size: int) -> list[str]:
    """Paragraph-aligned chunks of about `size` characters, never longer (long paragraphs are cut
    at line ends), so that perplexity windows stay short and memory stays bounded."""
    out, cur = [], ""
    lines = []
    for para in text.split("\n\n"):
        if len(para) <= size:
            lines.append(para)
            continue
        piece = ""
        for line in para.split("\n"):
            if piece and len(piece) + len(line) + 1 > size:
                lines.append(piece)
                piece = ""
            piece += (line[:size] + "\n")
        lines.append(piece)
    for para in lines:
        if cur and len(cur) + len(para) + 2 > size:
            out.append(cur.strip())
            cur = ""
        cur += para + "\n\n"
    if cur.strip():
        out.append(cur.strip())
    return [c[:size] for c in out if len(c) > size // 4]


def _sampled_files(seed: int) -> list[Path]:
    files = _stdlib_files()
    random.Random(f"stdlib:{seed}").shuffle(files)
    return files


def _python_code_docs(seed: int) -> list[str]:
    docs: list[str] = []
    for p in _sampled_files(seed):
        try:
            docs += _chunks(p.read_text(encoding="utf-8"), 1200)[:6]  # at most 6 chunks a file: variety
        except (UnicodeDecodeError, OSError):
            continue
        if len(docs) >= 2 * sum(DOMAIN_SIZES.values()):
            break
    return docs


def _english_docs(seed: int) -> list[str]:
    """English prose: docstrings of the standard library's modules, classes and functions."""
    docs: list[str] = []
    for p in _sampled_files(seed):
        if len(docs) >= 2 * sum(DOMAIN_SIZES.values()):
            break
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 300 and ">>>" not in doc:
                    docs += _chunks(doc, 1200)
    return docs


DOMAINS: dict[str, Callable[[int], list[str]]] = {
    "python_code": _python_code_docs,
    "english_docs": _english_docs,
}


def make_domain(name: str, seed: int = DEFAULT_SEED) -> dict[str, list[Example]]:
    docs = sorted(set(DOMAINS[name](seed)))
    random.Random(f"{name}:{seed}").shuffle(docs)
    out, start = {}, 0
    for split in SPLITS:
        part = docs[start:start + DOMAIN_SIZES[split]]
        out[split] = [{"id": f"{name}-{split}-{i}", "text": t} for i, t in enumerate(part)]
        start += DOMAIN_SIZES[split]
    return out


# ----------------------------------------------------------------------------- writing


def suite_dir(seed: int = DEFAULT_SEED) -> Path:
    return cache_dir() / "tasks" / f"suite-v{SUITE_VERSION}-seed{seed}"


def _task_yaml(name: str, folder: Path, t: Task | None) -> str:
    files = {s: str((folder / f"{s}.jsonl").resolve()) for s in SPLITS}
    head = (f"task: wb_{name}\ntag: [workbench]\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n" + "".join(f"    {s}: {p}\n" for s, p in files.items()) +
            "training_split: train\nvalidation_split: validation\ntest_split: test\n")
    if t is None:  # domain text: rolling log-likelihood
        return head + ("output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                       "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                       "  - metric: bits_per_byte\nmetadata:\n  version: 1.0\n")
    return head + (
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n  max_gen_toks: {t.max_gen_toks}\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        f"metadata:\n  version: 1.0\n  kind: {t.kind}\n  skill: {t.skill}\n")


def generate_suite(seed: int = DEFAULT_SEED, out: Path | None = None, sizes: dict[str, int] | None = None) -> Path:
    """Write every task and domain set (JSONL + lm-eval YAML); skip when already written."""
    out = Path(out) if out else suite_dir(seed)
    stamp = out / "suite.json"
    meta_want = {"version": SUITE_VERSION, "seed": seed, "sizes": {**DEFAULT_SIZES, **(sizes or {})},
                 "tasks": list(TASKS), "domains": list(DOMAINS)}
    if stamp.is_file() and json.loads(stamp.read_text()).get("spec") == meta_want:
        return out
    hashes = {}
    for name in list(TASKS) + list(DOMAINS):
        splits = make_examples(name, seed, sizes) if name in TASKS else make_domain(name, seed)
        folder = out / name
        for split, rows in splits.items():
            atomic_write_text(folder / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(folder / f"wb_{name}.yaml", _task_yaml(name, folder, TASKS.get(name)))
        # the same task scored on the validation split: hyperparameters are selected on it, never on test
        val_yaml = _task_yaml(name, folder, TASKS.get(name)).replace(f"task: wb_{name}\n", f"task: wb_{name}_val\n")
        atomic_write_text(folder / f"wb_{name}_val.yaml", val_yaml.replace("test_split: test", "test_split: validation"))
        hashes[name] = sha256_json(splits)[:16]
    atomic_write_text(stamp, json.dumps({"spec": meta_want, "data_sha256": hashes}, indent=2))
    return out


def load_split(name: str, split: str, seed: int = DEFAULT_SEED) -> list[Example]:
    folder = generate_suite(seed) / name
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; use one of {SPLITS}")
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def effective_limit(limit: int | None, tasks: list[str], split: str) -> int | None:
    """The limit a key should name: None (the whole split) when it covers every task's split, so that `limit: 10**5`
    on 100-example splits keys, and reuses, what the whole split keys; the limit as given otherwise, or when a task
    is not a suite task (its size is lm-eval's, not known without loading it)."""
    if limit is None or not tasks or any(t not in TASKS for t in tasks):
        return limit
    return None if all(limit >= _split_size(t, split) for t in tasks) else limit


@lru_cache(maxsize=256)
def _split_size(name: str, split: str) -> int:
    return len(load_split(name, split))


def data_hash(name: str, seed: int = DEFAULT_SEED) -> str:
    return json.loads((generate_suite(seed) / "suite.json").read_text())["data_sha256"][name]


def task_group(name: str) -> str:
    """held_in, held_out, domain (a perplexity corpus) or unknown."""
    return TASKS[name].kind if name in TASKS else "domain" if name in DOMAINS else "unknown"
