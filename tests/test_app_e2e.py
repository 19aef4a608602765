"""The app end to end in a real headless Chromium (Debian `chromium`, driven by Playwright) against
`streamlit run --server.headless true`: every view visited, the Playground run on the tiny model, no exception
element anywhere, a screenshot per view."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "app"))

pytest.importorskip("playwright", reason="`./setup.sh dev` installs Playwright for Python")
import browser  # noqa: E402


def test_every_view_in_a_real_browser(app_world, tmp_path):
    env = {k: v for k, v in app_world.items() if k.startswith("WORKBENCH_")}
    shots = Path(os.environ.get("WORKBENCH_SCREENS") or tmp_path / "screens")
    with browser.serve_app(Path(env["WORKBENCH_RESULTS"]), env=env) as url:
        found = browser.visit_all(url, shots, log=lambda *a: None)
    assert list(found) == browser.VIEWS
    assert not {v: e for v, e in found.items() if e}
    files = sorted(p.name for p in shots.glob("*.png"))
    assert len(files) == len(browser.VIEWS)
    assert all((shots / f).stat().st_size > 10_000 for f in files)  # a rendered page, not a blank one


def test_the_browser_driver_sees_an_exception_element(app_world, tmp_path):
    """The check above can fail: a results folder that is a file makes the app show st.error, and an app that
    raises shows Streamlit's exception element, which `exceptions` finds."""
    bad = tmp_path / "app_raise.py"
    bad.write_text("import streamlit as st\nst.sidebar.radio('view', ['x'])\nraise ValueError('boom')\n")
    from playwright.sync_api import sync_playwright

    import subprocess
    import time

    port = browser._free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(bad), "--server.headless", "true",
                             "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=browser.chromium_path(), args=browser.CHROMIUM_ARGS)
            page = b.new_page()
            deadline = time.time() + 60
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}")
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)
            browser._settle(page)
            assert any("boom" in e for e in browser.exceptions(page))
            b.close()
    finally:
        proc.terminate()
        proc.wait(10)
