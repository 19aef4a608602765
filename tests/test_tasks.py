"""Task suite: determinism, disjoint splits, answers recomputed independently, real words."""

import json
import re
from pathlib import Path

import pytest
import yaml

from workbench.io import sha256_json
from workbench.tasks import TASKS, check_answer, generate_suite, load_split
from workbench.tasks.suite import DOMAINS, data_hash, english_words, make_domain, make_examples

# data hashes of the tasks that existed before the held-out variants were added, computed from that code (and
# recorded in the committed results): experts, merges and results are keyed by them, so they must never change
PINNED_DATA = {"addition": "e0410802ffece5db", "sorting": "08dd0eac95755149", "unit_conversion": "174d483dab75f148",
               "word_count": "6addfae24f114a77", "repeat_word": "fea09ca99072d8f9", "reverse_words": "71ca8b4d890baf95",
               "subtraction": "921d9d530c12cdb0", "addition_phrase": "0d893613808c83f3",
               "sort_descending": "869734472c610eed"}
NEW_HELD_OUT = ["sort_phrase", "unit_phrase", "count_phrase", "repeat_phrase", "reverse_phrase", "convert_sum"]


def _recompute(name, f):
    """Independent answers from each example's inputs."""
    if name in ("addition", "addition_phrase"):
        return str(f["a"] + f["b"])
    if name == "subtraction":
        return str(f["a"] - f["b"])
    if name in ("sorting", "sort_phrase"):
        return " ".join(str(x) for x in sorted(f["xs"]))
    if name == "sort_descending":
        return " ".join(str(x) for x in sorted(f["xs"])[::-1])
    if name in ("unit_conversion", "unit_phrase"):
        return str(f["value"] * f["factor"])
    if name in ("word_count", "count_phrase"):
        return str(len(f["words"]))
    if name in ("repeat_word", "repeat_phrase"):
        return " ".join(f["word"] for _ in range(f["n"]))
    if name in ("reverse_words", "reverse_phrase"):
        return " ".join(f["words"][::-1])
    if name == "convert_sum":
        return str(f["a"] * f["factor"] + f["b"] * f["factor"])
    raise AssertionError(f"no checker for {name}")


def test_suite_shape():
    held_in = [n for n, t in TASKS.items() if t.kind == "held_in"]
    held_out = [n for n, t in TASKS.items() if t.kind == "held_out"]
    assert len(held_in) >= 6 and len(held_out) >= 6 and len(DOMAINS) >= 2


def test_every_held_in_skill_has_a_held_out_variant():
    held_in = {n for n, t in TASKS.items() if t.kind == "held_in"}
    held_out = {n: t for n, t in TASKS.items() if t.kind == "held_out"}
    for name, t in held_out.items():  # `skill` names the held-in task(s) reused, "+"-joined in order
        assert t.reuses == tuple(t.skill.split("+")) and set(t.reuses) <= held_in, (name, t.skill)
        assert t.description and "\n" not in t.description
    assert held_in == {s for t in held_out.values() for s in t.reuses}
    # a variant of each skill alone (picking one expert), and one needing two skills in sequence (combining)
    assert held_in == {t.reuses[0] for t in held_out.values() if len(t.reuses) == 1}
    assert any(len(t.reuses) == 2 for t in held_out.values())
    assert all(TASKS[n].reuses == (n,) for n in held_in)


def test_existing_task_data_unchanged():
    """Adding tasks must not alter an existing task's examples (each task's RNG is seeded by its name)."""
    assert {n: sha256_json(make_examples(n))[:16] for n in PINNED_DATA} == PINNED_DATA
    assert {n: data_hash(n) for n in PINNED_DATA} == PINNED_DATA  # as recorded by the written suite


UNIT_FACTORS = {("km", "m"): 1000, ("m", "cm"): 100, ("cm", "mm"): 10, ("kg", "g"): 1000, ("L", "mL"): 1000,
                ("m", "mm"): 1000}


def _solve_from_question(name, q):
    """The answer worked out from the question's text alone (not from `fields`, not with the suite's code)."""
    body = q.removesuffix("\nAnswer:")
    if name == "sort_phrase":
        digits = body.removeprefix("Put in ascending order: ").split()
        return " ".join(sorted(digits))
    if name == "unit_phrase":
        dst, v, src = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", body).groups()
        return str(int(v) * UNIT_FACTORS[src, dst])
    if name == "count_phrase":
        return str(len(body.removeprefix("How many words are in: ").split(" ")))
    if name == "repeat_phrase":
        w, n = re.fullmatch(r"Write the word (\w+) (\d) times", body).groups()
        return " ".join([w] * int(n))
    if name == "reverse_phrase":
        return " ".join(reversed(body.removeprefix("Say these words in reverse order: ").split(" ")))
    if name == "convert_sum":
        a, b, src, dst = re.fullmatch(r"Convert: (\d\d)\+(\d\d) (\w+) to (\w+)", body).groups()
        return str((int(a) + int(b)) * UNIT_FACTORS[src, dst])
    raise AssertionError(f"no solver for {name}")


def test_new_held_out_tasks_by_hand():
    """A few examples written out, then a sample of each new task solved from its question text."""
    ex = {n: make_examples(n)["test"] for n in NEW_HELD_OUT}
    assert _solve_from_question("convert_sum", "Convert: 12+35 kg to g\nAnswer:") == "47000"
    assert _solve_from_question("unit_phrase", "How many mm are in 7 cm?\nAnswer:") == "70"
    assert _solve_from_question("repeat_phrase", "Write the word house 3 times\nAnswer:") == "house house house"
    assert _solve_from_question("reverse_phrase", "Say these words in reverse order: a b c\nAnswer:") == "c b a"
    for name in NEW_HELD_OUT:
        t = TASKS[name]
        assert t.kind == "held_out"
        for e in ex[name][:25]:
            assert e["answer"] == _solve_from_question(name, e["question"]), (name, e)
            assert check_answer(f" {e['answer']}\n", e["answer"])
        # the question never holds its answer (sort_phrase never draws an already sorted list)
        assert all(e["answer"] not in e["question"] for split in make_examples(name).values() for e in split), name
        # a new surface: no question is a held-in task's question
        held_in_qs = {x["question"] for r in t.reuses for x in make_examples(r)["test"]}
        assert not held_in_qs & {e["question"] for e in ex[name]}


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
