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
import browser


def test_every_view_in_a_real_browser(app_world, tmp_path):
    """Every view opened by its URL, the Playground run, no exception element; each screenshot is the whole page
    (Streamlit scrolls inside its own container: a window-sized shot would stop at 1000 px); and on the per-task bars
    as Chromium renders them, each whisker sits on its own bar's centre."""
    from playwright.sync_api import sync_playwright

    env = {k: v for k, v in app_world.items() if k.startswith("WORKBENCH_")}
    shots = Path(os.environ.get("WORKBENCH_SCREENS") or tmp_path / "screens")
    results = Path(env["WORKBENCH_RESULTS"])
    with browser.serve_app(results, env=env) as url:
        found = browser.visit_all(url, shots, results=results, log=lambda *a: None)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=browser.chromium_path(), args=browser.CHROMIUM_ARGS)
            page = b.new_page(viewport={"width": browser.WIDTH, "height": browser.HEIGHT})
            page.goto(f"{url}/?view=Per-task+charts&costs=off&results={results}")
            browser._settle(page)
            offsets = browser.whisker_offsets(page)
            b.close()
    assert [v["view"] for v in found.values()] == browser.VIEWS
    assert not {k: v["exceptions"] for k, v in found.items() if v["exceptions"]}
    files = sorted(p.name for p in shots.glob("*.png"))
    assert files == sorted(f"{k}.png" for k in found) and len(files) == len(browser.VIEWS)
    assert all((shots / f).stat().st_size > 10_000 for f in files)  # a rendered page, not a blank one
    sizes = {k: browser.png_size(shots / f"{k}.png") for k in found}
    assert all(size == tuple(found[k]["size"]) for k, size in sizes.items())
    # bars, heatmap and both scatters: taller than the window, and captured whole
    assert sizes["02-per-task-charts"][1] > browser.HEIGHT + 500, sizes
    assert len(offsets) == 5 * 2  # 5 rows x 2 tasks of the fixture's comparison
    assert all(abs(d) <= 0.5 for d in offsets.values()), offsets


def test_the_browser_driver_sees_an_exception_element(app_world, tmp_path):
    """The check above can fail: a results folder that is a file makes the app show st.error, and an app that
    raises shows Streamlit's exception element, which `exceptions` finds."""
    bad = tmp_path / "app_raise.py"
    bad.write_text("import streamlit as st\nst.sidebar.radio('view', ['x'])\nraise ValueError('boom')\n")
    import subprocess
    import time

    from playwright.sync_api import sync_playwright

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
                except Exception:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)
            browser._settle(page)
            assert any("boom" in e for e in browser.exceptions(page))
            b.close()
    finally:
        proc.terminate()
        proc.wait(10)
