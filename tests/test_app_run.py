"""The Run view (app/views/run.py) and the background jobs behind it (workbench/jobs.py) under AppTest on the tiny
pool of conftest's `app_world`: per-method forms (only the parameters a method reads, at its defaults), the output
kind, the task choice, the cost preview, jobs in processes of their own that are listed from disk after a restart
of the app, a stop that ends the job's process and removes its lock, and a killed job's stale lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app" / "app.py")


@pytest.fixture()
def res(app_world, monkeypatch, tmp_path):
    """A copy of the fixture's results (the jobs write there), the env pointing at it; jobs left live are killed."""
    from workbench import jobs

    for k, v in app_world.items():
        if k.startswith("WORKBENCH_"):
            monkeypatch.setenv(k, v)
    out = tmp_path / "results"
    shutil.copytree(Path(app_world["root"]) / "results", out)
    monkeypatch.setenv("WORKBENCH_RESULTS", str(out))
    yield out
    for j in jobs.list_jobs(out):
        if j["status"] in jobs.LIVE and isinstance(j.get("pid"), int):
            try:
                os.killpg(j["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    for r in jobs.background_runs():
        if r.thread is not None:
            r.thread.join(60)
    jobs._RUNS.clear()


def open_run(results: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.sidebar.text_input(key="results_dir").set_value(str(results)).run()
    at.sidebar.radio(key="view").set_value("Run").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def wait_for(cond, timeout: float = 120.0, what: str = ""):
    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def keys(at: AppTest, prefix: str) -> set[str]:
    widgets = [*at.number_input, *at.checkbox, *at.text_input, *at.selectbox]
    return {w.key for w in widgets if w.key and w.key.startswith(prefix)}


def test_each_method_shows_only_its_parameters_at_its_defaults(res):
    at = open_run(res)
    at.selectbox(key="run-method").set_value("ties").run()
    ties = {k.rsplit("-", 1)[1] for k in keys(at, "run-p-ties-")}
    assert {"density", "lambda", "weight", "normalize", "rescale", "int8_mask"} <= ties
    assert not ties & {"gamma", "epsilon", "seed"}  # breadcrumbs', DELLA's, the random drops'
    assert at.number_input(key="run-p-ties-density").value == pytest.approx(0.2)  # trims: not 1.0 (keep all)
    assert at.checkbox(key="run-p-ties-normalize").value is True  # TIES's own default (mergekit's), not "None"
    at.selectbox(key="run-method").set_value("task_arithmetic").run()
    ta = {k.rsplit("-", 1)[1] for k in keys(at, "run-p-task_arithmetic-")}
    assert "lambda" in ta and not ta & {"density", "rescale", "gamma", "epsilon", "seed", "int8_mask"}
    at.selectbox(key="run-method").set_value("della").run()
    della = {k.rsplit("-", 1)[1] for k in keys(at, "run-p-della-")}
    assert {"density", "epsilon", "seed"} <= della and "gamma" not in della
    assert not at.exception


def test_the_run_form_offers_no_expert_that_is_not_built(res, app_world, tiny_dir, tmp_path, monkeypatch):
    """A fresh clone's demo pool lists multitask-r64 without its weights (`workbench demo --full` builds it): the
    Run form does not offer it (picking it could only fail)."""
    from workbench.pool import Pool

    pools = tmp_path / "adapters"
    shutil.copytree(app_world["WORKBENCH_POOLS"], pools)
    monkeypatch.setenv("WORKBENCH_POOLS", str(pools))
    p = Pool.open("demo")
    p.add(tiny_dir / "lora_a", "unshipped")
    with p._locked():
        p._put(p.expert("unshipped").entry.model_copy(update={"rebuild": "workbench demo --full"}))
    shutil.rmtree(p.expert("unshipped").path)
    at = open_run(res)
    at.selectbox(key="run-method").set_value("ties").run()
    offered = at.multiselect(key="run-experts").options
    assert "addition" in offered and "unshipped" not in offered, offered


def test_the_cost_preview_counts_cells_and_estimates_from_past_runs(res, tmp_path):
    at = open_run(res)
    at.selectbox(key="run-method").set_value("ties").run()
    at.multiselect(key="run-experts").set_value(["addition", "sorting"]).run()
    at.multiselect(key="run-tasks").set_value(["addition", "sorting"]).run()
    at.number_input(key="run-limit").set_value(3).run()
    info = [i.value for i in at.info if i.value.startswith("cost:")]
    # base, addition, sorting and ties on two tasks, and the ties build: 9 cells; 8 evaluations x 3 examples
    assert info and info[-1].startswith("cost: 9 of 9 cells to run (1 builds, 8 evaluations x 3 examples = 24 examples)")
    # the fixture's comparison recorded its cells' times: the estimate is from them
    from workbench.jobs import past_times

    past = past_times(res)
    assert past["cells"] > 0 and "past cells" in info[-1] and "about " in info[-1]
    # a folder without any past run says so
    empty = tmp_path / "empty"
    empty.mkdir()
    at.sidebar.text_input(key="results_dir").set_value(str(empty)).run()
    info = [i.value for i in at.info if i.value.startswith("cost:")]
    assert info and "no past runs" in info[-1]


def long_job_doc(name: str) -> dict:
    """A ties comparison on held-in and held-out tasks at 100 examples each: long enough to stop in its middle."""
    from workbench.jobs import comparison_document

    return comparison_document("demo", "ties", {"density": 0.5}, experts=["addition", "sorting"],
                               tasks=["held_in", "held_out"], limit=100, name=name)


def test_a_job_survives_a_restart_of_the_app_and_stop_ends_its_process_and_lock(res):
    from workbench import jobs

    at = open_run(res)
    at.selectbox(key="run-method").set_value("ties").run()
    at.multiselect(key="run-experts").set_value(["addition", "sorting"]).run()
    out = at.radio(key="run-output-ties").options  # the output kind, where the method can write both
    assert len(out) == 2 and out[0].startswith("adapter space: a LoRA") and out[1].startswith("a full model (about")
    at.radio(key="run-output-ties").set_value("lora").run()
    assert at.number_input(key="run-rank-ties").value == 6  # the experts' ranks (4 + 2)
    at.multiselect(key="run-tasks").set_value(["held_in", "held_out"]).run()
    at.number_input(key="run-limit").set_value(100).run()
    at.button(key="run-go-build").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    folder = res / jobs.JOBS_FOLDER / "demo-ties"
    req = json.loads((folder / "request.json").read_text())
    assert req["comparison"]["entries"][-1]["output"] == {"kind": "lora", "rank": 6}
    run = next(r for r in jobs.background_runs() if r.name == "demo-ties")
    proc = run.proc
    assert proc is not None and proc.pid != os.getpid()  # a process of its own
    # running, one evaluation cell finished at least (after the build)
    wait_for(lambda: (jobs.read_job(folder) or {}).get("progress", {}).get("done", 0) >= 2, 240, "two cells")
    assert (folder / "lock").read_text().strip() == str(proc.pid)

    jobs._RUNS.clear()  # the app restarts: nothing of this process's memory is left
    at = open_run(res)
    bars = [p for p in at.get("progress") if "demo-ties" in str(p.proto.text)]
    assert bars and "cells" in str(bars[0].proto.text)
    assert any(e.label.startswith("demo-ties log") for e in at.expander)
    assert any(e.label.startswith("demo-ties leaderboard of its finished cells") for e in at.expander)
    at.button(key="run-stop-demo-ties").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert proc.wait(10) == 143  # its process ended, through its SIGTERM handler (a clean stop, not a kill)
    assert not (folder / "lock").exists()
    st = jobs.read_job(folder)
    assert st["status"] == "stopped" and st["progress"]["done"] < st["progress"]["total"]
    # the build's own progress reached the job's record: the merge's progress bar, tensor by tensor
    merge = [s for s in st["steps"] if s["cell"] == "build ties" and s["desc"] == "ties (2 experts)"]
    assert merge and merge[0]["done"] == merge[0]["total"] > 0
    # the comparison's own lock is free: another run can start at once
    import fcntl

    from workbench.io import lock_for

    with open(lock_for(res / "compare" / "demo-ties"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    at.run()
    assert any(w.value.startswith("demo-ties: stopped") for w in at.warning)
    assert not any(b.key == "run-stop-demo-ties" for b in at.button)


def test_a_killed_jobs_stale_lock_is_found_and_removed_after_a_restart(res):
    from workbench import jobs

    run = jobs.start_background(long_job_doc("killed"), results_dir=res, process=True)
    folder = res / jobs.JOBS_FOLDER / "killed"
    wait_for(lambda: (jobs.read_job(folder) or {}).get("status") == "running", 120, "running")
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.proc.wait(10)
    run.thread.join(10)
    assert run.status == "interrupted"
    jobs._RUNS.clear()  # the app restarts
    # what a restart found before: a status still "running" and the lock file of a dead process
    assert json.loads((folder / "status.json").read_text())["status"] == "running" and (folder / "lock").exists()
    at = open_run(res)
    assert any(w.value.startswith("killed: interrupted") for w in at.warning), [w.value for w in at.warning]
    assert not (folder / "lock").exists()
    assert jobs.read_job(folder)["status"] == "interrupted"
    # and it can be launched again (its lock is free)
    with pytest.raises(Exception, match="not running"):
        jobs.stop_job("killed", res)


def test_progress_bars_report_to_watchers_of_their_thread():
    """The hook a job follows a build's steps by (training steps, merged tensors): every bar's start, updates and end."""
    from workbench.progress import progress_bar, watch

    seen = []
    with watch(seen.append), progress_bar("merge", total=3) as bar:
        bar.update(loss=0.5)
        bar.update(2)
    with progress_bar("unwatched", total=1) as bar:
        bar.update()
    assert [(s["desc"], s["done"], s["total"], s["finished"]) for s in seen] == [
        ("merge", 0, 3, False), ("merge", 1, 3, False), ("merge", 3, 3, False), ("merge", 3, 3, True)]
    assert seen[1]["info"] == "loss=0.5"
