"""Drive the app in a real headless Chromium (Playwright): start `streamlit run`, open every view (each by its URL,
as a shared link opens it), run the Playground, fail on any exception element, save a whole-page screenshot per view.
Used by the end-to-end test and by `python app/browser.py --results results --out results/screens` (the committed
screenshots).

The screenshots (`SHOTS`): Leaderboard; Per-task charts with the cost-vs-quality and held-in vs held-out scatters;
Pairwise and Examples (filtered: where A and B differ) on the routing comparison when there is one; Sweeps; Routing;
the Playground after a streamed answer; the Run view with a stopped run (a short real job started from the view
against a scratch copy of the results folder, then stopped: `--no-run` leaves it out); Benchmarks.

Streamlit scrolls inside its own container (`stMain`), so a full-page screenshot of the window stops at the viewport:
`capture` sets the viewport as tall as the content first (at most `MAX_SHOT_PX`), then takes it whole.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
VIEWS = ["Leaderboard", "Per-task charts", "Pairwise", "Examples", "Sweeps", "Routing", "Playground", "Run",
         "Benchmarks"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
WIDTH, HEIGHT = 1400, 1000  # the window; a screenshot grows to the content's height
MAX_SHOT_PX = 20_000  # a screenshot's height at most (a page taller than this is cut)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("no chromium on PATH: `./setup.sh dev` installs Debian's chromium (apt-get install chromium)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(results: Path, env: dict[str, str] | None = None, timeout: float = 90.0):
    """`streamlit run app/app.py` headless on a free port; yields its URL; stops it after."""
    port = _free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           "--", "--results", str(results)]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"streamlit-{port}.log", "w")  # noqa: SIM115 - open while it runs
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}: see {log.name}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"streamlit did not listen within {timeout:.0f}s: see {log.name}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


_IDLE = ("() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')"
         " && !document.querySelector('[data-testid=\"stSpinner\"]')")


def _settle(page, timeout_ms: int = 180_000) -> None:
    """Wait until the script run has ended (no running icon, no spinner) and stayed ended for a moment."""
    page.wait_for_selector('[data-testid="stSidebar"]', timeout=timeout_ms)
    deadline = time.time() + timeout_ms / 1000
    page.wait_for_timeout(400)
    while time.time() < deadline:
        page.wait_for_function(_IDLE, timeout=timeout_ms)
        page.wait_for_timeout(700)
        if page.evaluate(_IDLE):
            return
    raise TimeoutError("the app kept running")


def exceptions(page) -> list[str]:
    return [e.inner_text()[:300] for e in page.query_selector_all('[data-testid="stException"]')]


_CONTENT_HEIGHT = """() => {
  const main = document.querySelector('[data-testid="stMain"]');
  const side = document.querySelector('[data-testid="stSidebarContent"]');
  return Math.max(main ? main.scrollHeight : 0, side ? side.scrollHeight : 0, window.innerHeight);
}"""


def capture(page, path: Path, width: int = WIDTH) -> tuple[int, int]:
    """A screenshot of the whole page: the viewport made as tall as Streamlit's scrolling container's content (charts
    re-laid out at that size, measured again until it holds), then restored. Returns the image's (width, height)."""
    height = HEIGHT
    for _ in range(4):
        want = min(MAX_SHOT_PX, int(page.evaluate(_CONTENT_HEIGHT)))
        if want == height:
            break
        height = want
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(600)  # charts that stretch re-render at the new size
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=False)
    page.set_viewport_size({"width": width, "height": HEIGHT})
    return width, height


def png_size(path: Path) -> tuple[int, int]:
    """A PNG's (width, height), from its header."""
    import struct

    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    return struct.unpack(">II", head[16:24])


_MARKS = """() => [...document.querySelectorAll('.vega-embed svg [aria-roledescription]')]
  .filter(e => ['bar', 'rule mark'].includes(e.getAttribute('aria-roledescription')))
  .map(e => { const r = e.getBoundingClientRect();
              return [e.getAttribute('aria-roledescription'), e.getAttribute('aria-label') || '', r.x + r.width / 2]; })"""


def whisker_offsets(page) -> dict[tuple[str, str], float]:
    """On a page showing the per-task bars (drawn as SVG, as Streamlit draws a chart of under 2,000 marks): per (task,
    model), the horizontal distance in px from its bar's centre to its whisker (its 95% rule), as rendered."""
    import re

    def key(label: str) -> tuple[str, str] | None:
        task, model = re.search(r"(?:^|; )task: ([^;]*)", label), re.search(r"(?:^|; )model: ([^;]*)", label)
        return (task.group(1), model.group(1)) if task and model else None

    bars, rules = {}, {}
    for role, label, x in page.evaluate(_MARKS):
        k = key(label)
        if k is not None:
            (bars if role == "bar" else rules)[k] = x
    return {k: rules[k] - bars[k] for k in bars if k in rules}


def shots(results: Path) -> list[tuple[str, str, dict[str, str]]]:
    """(file stem, view, query parameters) of every screenshot, chosen from what `results` holds: the routing
    comparison (else the first); Pairwise and Examples on its first row against its reference, on the task where
    the two differ most."""
    sys.path.insert(0, str(ROOT))
    from workbench import catalog

    cat = catalog.scan(results)
    comps = sorted(cat.comparisons)
    comp = "routing" if "routing" in comps else (comps[0] if comps else None)
    on = {"source": f"comparison: {comp}"} if comp else {}
    pair = {}
    if comp:  # the first row against the reference, on the task where they differ most (a page with examples)
        src = catalog.comparison_source(cat, comp)
        names = [r["name"] for r in src.rows]
        a = names[0] if names else None
        b = src.reference if src.reference in names and src.reference != a else next((n for n in names if n != a), None)
        rows = [r for r in src.pairwise(a, b) if r.get("kind") == "accuracy"] if a and b else []
        if rows:
            pair = {"A": a, "B": b, "task": max(rows, key=lambda r: abs(r["diff"]))["task"]}
    return [("01-leaderboard", "Leaderboard", on),
            ("02-per-task-charts", "Per-task charts", {**on, "costs": "on"}),
            ("03-pairwise", "Pairwise", {**on, **pair}),
            ("04-examples", "Examples", {**on, **pair, "filter": "differ"}),
            ("05-sweeps", "Sweeps", {}),
            ("06-routing", "Routing", {}),
            ("07-playground", "Playground", {}),
            ("08-run", "Run", {}),
            ("09-benchmarks", "Benchmarks", {})]


def _playground(page, log, max_tokens: int = 16, timeout_s: float = 600.0) -> None:
    """Load the pool, run the default prompt through the preselected models (at most `max_tokens` each), wait for
    every answer to end."""
    load = page.get_by_role("button", name="load pool")
    if load.count():
        load.first.click()
        _settle(page)
    run = page.get_by_role("button", name="run", exact=True)
    if run.count():
        box = page.get_by_label("max new tokens")
        if box.count():
            box.first.fill(str(max_tokens))
            box.first.press("Enter")
            _settle(page)
        run.first.click()
        page.wait_for_selector("text=models in one batch", timeout=1000 * timeout_s)
        _settle(page)
    else:
        log("Playground: no run button (no pool?)")


def _run_and_stop(page, log, limit: int = 2, running_s: float = 8.0) -> None:
    """In the Run view: build one (the form's defaults, `limit` examples per task), launch, let it run, stop it, and
    wait until the view lists it as stopped."""
    page.get_by_role("tab", name="build one").click()
    _settle(page)
    box = page.get_by_label("examples per task (0: all)").last
    box.fill(str(limit))
    box.press("Enter")
    _settle(page)
    page.get_by_role("button", name="launch").last.click()
    page.wait_for_selector("text=started", timeout=60_000)
    deadline = time.time() + 120
    stop = page.get_by_role("button", name="stop")
    while not stop.count():
        if time.time() > deadline:
            raise TimeoutError("the job never showed a stop button")
        page.wait_for_timeout(500)
    page.wait_for_timeout(1000 * running_s)
    stop.first.click()
    page.wait_for_selector("text=stopped after", timeout=120_000)
    page.wait_for_timeout(1500)
    log("Run: a job started and stopped")


def visit_all(url: str, out: Path | None, *, results: Path | None = None, run_job: bool = False,
              views: list[str] | None = None, width: int = WIDTH, log=print) -> dict[str, dict]:
    """Open every shot of `shots(results)` by its URL (screenshot each whole into `out`), run the Playground and,
    with `run_job`, start and stop a job in the Run view (on a server whose results folder is a scratch copy: it
    writes there); `views`: only the shots of these views. Returns per shot: its view, the exceptions shown and the
    screenshot's size."""
    from playwright.sync_api import sync_playwright

    results = Path(results) if results is not None else None
    plan = [s for s in shots(results if results is not None else ROOT / "results") if views is None or s[1] in views]
    found: dict[str, dict] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": width, "height": HEIGHT})
        for stem, view, params in plan:
            page.goto(f"{url}/?" + urlencode({"view": view, **({"results": str(results)} if results else {}),
                                              **params}))
            _settle(page)
            if view == "Playground":
                _playground(page, log)
            if view == "Run" and run_job:
                _run_and_stop(page, log)
            found[stem] = {"view": view, "exceptions": exceptions(page)}
            if out is not None:
                found[stem]["size"] = capture(page, out / f"{stem}.png", width)
            log(f"{stem}: {'ok' if not found[stem]['exceptions'] else found[stem]['exceptions']}"
                + (f" ({found[stem]['size'][0]}x{found[stem]['size'][1]})" if "size" in found[stem] else ""))
        browser.close()
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default="results/screens")
    ap.add_argument("--no-run", action="store_true", help="leave out the Run view's started-and-stopped job")
    a = ap.parse_args()
    results = Path(a.results).resolve()
    out = Path(a.out).resolve()
    # inside the checkout, pass it relative to it (streamlit runs there): screenshots show no machine path
    shown = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    with serve_app(shown) as url:
        found = visit_all(url, out, results=shown)
    if not a.no_run:  # the job writes into its results folder and the artifact cache: scratch copies of both
        with tempfile.TemporaryDirectory(prefix="wb-shots-") as tmp:
            scratch = Path(tmp) / "results"
            shutil.copytree(results, scratch, ignore=shutil.ignore_patterns("screens", ".jobs"))
            env = {"WORKBENCH_CACHE_ARTIFACTS": str(Path(tmp) / "artifacts")}
            with serve_app(scratch, env=env) as url:
                found |= visit_all(url, out, results=scratch, run_job=True, views=["Run"])
    bad = {k: v["exceptions"] for k, v in found.items() if v["exceptions"]}
    if bad:
        raise SystemExit(f"exceptions in views: {bad}")


if __name__ == "__main__":
    main()
