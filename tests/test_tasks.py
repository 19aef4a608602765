"""Task suite: determinism, disjoint splits, answers recomputed independently, real words."""

import json
from pathlib import Path

import pytest
import yaml

from workbench.tasks import TASKS, check_answer, generate_suite, load_split
from workbench.tasks.suite import DOMAINS, english_words, make_domain, make_examples


def _recompute(name, f):
    """Independent answers from each example's inputs."""
    if name in ("addition", "addition_phrase"):
        return str(f["a"] + f["b"])
    if name == "subtraction":
        return str(f["a"] - f["b"])
    if name == "sorting":
        return " ".join(str(x) for x in sorted(f["xs"]))
    if name == "sort_descending":
        return " ".join(str(x) for x in sorted(f["xs"])[::-1])
    if name == "unit_conversion":
        return str(f["value"] * f["factor"])
    if name == "word_count":
        return str(len(f["words"]))
    if name == "repeat_word":
        return " ".join(f["word"] for _ in range(f["n"]))
    if name == "reverse_words":
        return " ".join(f["words"][::-1])
    raise AssertionError(f"no checker for {name}")


def test_suite_shape():
    held_in = [n for n, t in TASKS.items() if t.kind == "held_in"]
    held_out = [n for n, t in TASKS.items() if t.kind == "held_out"]
    assert len(held_in) >= 6 and len(held_out) >= 2 and len(DOMAINS) >= 2


@pytest.mark.parametrize("name", list(TASKS))
def test_determinism_disjointness_and_answers(name):
    a = make_examples(name, seed=7)
    assert a == make_examples(name, seed=7)
    assert a != make_examples(name, seed=8)
    assert [len(a[s]) for s in ("train", "validation", "test")] == [1000, 100, 100]
    questions = {s: {ex["question"] for ex in rows} for s, rows in a.items()}
    assert all(len(q) == len(a[s]) for s, q in questions.items())  # no duplicates within a split
    assert not (questions["train"] & questions["validation"] or questions["train"] & questions["test"]
                or questions["validation"] & questions["test"])
    for rows in a.values():
        for ex in rows:
            assert ex["question"].endswith("\nAnswer:")
            assert ex["answer"] == _recompute(name, ex["fields"])
            assert 0 < len(ex["answer"]) <= 40


def test_words_are_real_english():
    words = set(english_words())
    assert len(words) >= 1000 and {"water", "house"} <= words
    for name in ("word_count", "reverse_words", "repeat_word"):
        for ex in make_examples(name, seed=1)["test"]:
            ws = ex["fields"].get("words") or [ex["fields"]["word"]]
            assert all(w in words for w in ws)


def test_check_answer():
    assert check_answer(" 85", "85") and check_answer("85\n", "85")
    assert not check_answer("85.", "85") and not check_answer("8 5", "85") and not check_answer("", "85")


def test_domain_sets_disjoint():
    for name in DOMAINS:
        d = make_domain(name)
        texts = [{x["text"] for x in d[s]} for s in ("train", "validation", "test")]
        assert all(texts) and not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_written_suite_is_valid_lm_eval():
    from lm_eval.tasks import TaskManager

    folder = generate_suite()
    for name in [*TASKS, *DOMAINS]:
        cfg = yaml.safe_load((folder / name / f"wb_{name}.yaml").read_text())
        assert cfg["task"] == f"wb_{name}"
        for path in cfg["dataset_kwargs"]["data_files"].values():
            assert path.startswith("/") and len(Path(path).read_text().splitlines()) > 0
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    assert {f"wb_{n}" for n in [*TASKS, *DOMAINS]} <= set(tm.all_tasks)
    assert load_split("addition", "test") == [json.loads(x) for x in (folder / "addition" / "test.jsonl").read_text().splitlines()]
