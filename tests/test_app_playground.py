"""The Playground (app/views/playground.py) under streamlit.testing.v1.AppTest on the tiny pool of conftest's
`app_world`: prompts in the evaluation's format by default (answers equal PEFT's own greedy generate on the
prompt as the evaluation encodes it), answers streamed through the serving scheduler without blocking the session,
with times per model, a cancel that stops the decoding, and links that preselect models and prompt."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app" / "app.py")


@pytest.fixture()
def world(app_world, monkeypatch):
    for k, v in app_world.items():
        if k.startswith("WORKBENCH_"):
            monkeypatch.setenv(k, v)
    yield Path(app_world["root"])


def open_playground(query: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    if at.sidebar.radio(key="view").value != "Playground":
        at.sidebar.radio(key="view").set_value("Playground").run()
    assert not at.exception, [e.value for e in at.exception]
    if any(b.key == "pg-load" for b in at.button):  # the pool loads on a click (once per process)
        at.button(key="pg-load").click().run()
    assert not at.exception and any(m.key == "pg-models" for m in at.multiselect)
    return at


def finished(at: AppTest, timeout: float = 120.0) -> AppTest:
    """Rerun (as the page's polling does) until every answer has ended."""
    deadline = time.time() + timeout
    while not any("models in one batch" in c.value for c in at.caption):
        assert time.time() < deadline, "the generation did not end"
        time.sleep(0.2)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def peft_reference(models: list[str], prompt: str, max_new: int, chat: bool = False) -> list[str]:
    """Each model's greedy answer by PEFT's own generate (not the serving engine) on the prompt as the evaluation
    encodes it (`tasks.suite.encode_text`: no special tokens), cut as lm-eval cuts it (`until: ["\\n"]`) and read as
    its filter reads it (whitespace stripped); with `chat`, on the chat-formatted prompt, uncut."""
    import torch
    from peft import PeftModel

    from workbench.pool import Pool
    from workbench.tasks.suite import encode_text

    pool = Pool.open("demo")
    tok = pool.base.tokenizer()
    if chat:
        ids = torch.tensor([list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)["input_ids"])])
    else:
        ids = torch.tensor([encode_text(tok, prompt)])
    out = []
    for m in models:
        model = pool.base.load().eval() if m == "base" else \
            PeftModel.from_pretrained(pool.base.load(), str(pool.expert(m).path)).eval()
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        text = tok.decode(new, skip_special_tokens=True)
        out.append(text if chat else text.split("\n")[0].strip())
    return out


def test_the_prompt_is_in_the_evaluations_format_and_answers_match_peft(world):
    at = open_playground()
    from views.playground import DEFAULT_PROMPT

    # the defaults: the evaluation's format (no chat template) and a question as the suite asks it
    assert at.checkbox(key="pg-chat").value is False
    assert at.text_area(key="pg-prompt").value == DEFAULT_PROMPT == "Add: 12+34\nAnswer:"
    at.multiselect(key="pg-models").set_value(["base", "addition"]).run()
    at.number_input(key="pg-max").set_value(8).run()
    at.button(key="pg-run").click().run()
    assert not at.error, [e.value for e in at.error]
    finished(at)
    texts = [t.value for t in at.text]
    want = peft_reference(["base", "addition"], DEFAULT_PROMPT, 8)
    assert all(want) and want[0] != want[1]  # real answers, and the adapter's differs: a wrong row cannot pass
    assert texts == [w or "(empty answer)" for w in want]
    # the format matters on this model: the chat-formatted prompt makes the adapter answer otherwise
    assert peft_reference(["addition"], DEFAULT_PROMPT, 8, chat=True)[0].strip() != want[1]
    # time per model: time to first token and total
    per_model = [c.value for c in at.caption if c.value.startswith("first token")]
    assert len(per_model) == 2 and all(re.match(r"first token \d+ ms · total \d+\.\d\d s · \d+ tokens · ended: "
                                                r"(stop|length)", c) for c in per_model), per_model


def test_answers_stream_without_blocking_the_session_and_cancel_stops_them(world):
    at = open_playground()
    at.multiselect(key="pg-models").set_value(["base", "addition", "sorting"]).run()
    at.checkbox(key="pg-chat").check().run()  # no newline stop: each sequence runs to its max
    at.number_input(key="pg-max").set_value(200).run()
    at.button(key="pg-run").click().run()
    gen = at.session_state["pg-gen"]
    assert not gen.finished  # the script returned while the models decode (a fragment polls)
    assert any(b.key == "pg-cancel" for b in at.button)
    deadline = time.time() + 60
    while not any(a.tokens >= 3 for a in gen.answers):  # tokens come in while the run goes on
        assert time.time() < deadline and not gen.finished
        time.sleep(0.05)
    at.run()
    partial = [t.value for t in at.text]
    assert any(p not in ("…", "") for p in partial) and not gen.finished
    at.button(key="pg-cancel").click().run()
    deadline = time.time() + 10  # each answer's drain sees the cancel within 0.1 s (longer on a loaded machine)
    while not gen.finished and time.time() < deadline:
        time.sleep(0.05)
    assert gen.finished and {a.state for a in gen.answers} == {"cancelled"}
    counts = [len(j.tokens) for j in gen.jobs]
    time.sleep(1.0)
    assert [len(j.tokens) for j in gen.jobs] == counts  # the scheduler dropped them: no token since
    assert all(c < 200 for c in counts)
    assert all(j.cancelled.is_set() for j in gen.jobs)
    at.run()
    assert any("models in one batch" in c.value for c in at.caption)
    assert sum("cancelled" in c.value for c in at.caption) == 3


def test_a_link_preselects_models_and_prompt(world):
    at = open_playground({"view": "Playground", "models": "sorting,addition,ghost", "prompt": "Sort: 3 1 2\nAnswer:"})
    assert at.multiselect(key="pg-models").value == ["sorting", "addition"]
    assert at.text_area(key="pg-prompt").value == "Sort: 3 1 2\nAnswer:"
    assert any("ghost" in w.value for w in at.warning)


def test_opening_the_playground_loads_nothing_until_asked(world):
    """Opening the view is fast: the pool loads into the serving engine on "load pool" (or on a link naming models),
    and once loaded it stays for the process."""
    import sys

    sys.path.insert(0, str(Path(APP).parent))
    import views.playground as pg

    pg._LOADED.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["view"] = "Playground"
    at.run()
    assert not at.exception and any(b.key == "pg-load" for b in at.button)
    assert not any(m.key == "pg-models" for m in at.multiselect)  # nothing loaded, no model list yet
    at.button(key="pg-load").click().run()
    assert any(m.key == "pg-models" for m in at.multiselect) and pg._LOADED
    again = AppTest.from_file(APP, default_timeout=120)
    again.query_params["view"] = "Playground"
    again.run()
    assert not any(b.key == "pg-load" for b in again.button)  # loaded once for every session
