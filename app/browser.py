"""Drive the app in a real headless Chromium (Playwright): start `streamlit run`, visit every view, run the
Playground, fail on any exception element, save a screenshot per view. Used by the end-to-end test and by
`python app/browser.py --results results --out results/screens` (the committed screenshots)."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VIEWS = ["Leaderboard", "Per-task charts", "Pairwise", "Examples", "Sweeps", "Routing", "Playground", "Run",
         "Benchmarks"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]


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
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"streamlit-{port}.log", "w")
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


def visit_all(url: str, out: Path | None, *, playground_models: list[str] | None = None,
              width: int = 1400, log=print) -> dict[str, list[str]]:
    """Visit every view (screenshot each into `out`), run the Playground; returns exceptions per view."""
    from playwright.sync_api import sync_playwright

    found: dict[str, list[str]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": width, "height": 1000})
        page.goto(url)
        _settle(page)
        for i, view in enumerate(VIEWS):
            page.locator('[data-testid="stSidebar"] label').filter(has_text=view).first.click()
            _settle(page)
            if view == "Playground":
                run = page.get_by_role("button", name="run")
                if run.count():
                    run.first.click()
                    _settle(page)
                    page.wait_for_selector("text=models in one batch", timeout=180_000)
            found[view] = exceptions(page)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out / f"{i + 1:02d}-{view.lower().replace(' ', '-')}.png"), full_page=True)
            log(f"{view}: {'ok' if not found[view] else found[view]}")
        browser.close()
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default="results/screens")
    a = ap.parse_args()
    results = Path(a.results).resolve()
    # inside the checkout, pass it relative to it (streamlit runs there): screenshots show no machine path
    with serve_app(results.relative_to(ROOT) if results.is_relative_to(ROOT) else results) as url:
        found = visit_all(url, Path(a.out))
    bad = {v: e for v, e in found.items() if e}
    if bad:
        raise SystemExit(f"exceptions in views: {bad}")


if __name__ == "__main__":
    main()
