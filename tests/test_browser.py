"""03_attention's explorer in a real browser: JupyterLab served on 127.0.0.1 with a token,
driven by Playwright in the system's Chromium (nothing is downloaded).

Skipped, saying why, without Chromium (``apt-get install chromium``) or Playwright for
Python (``pip install playwright``; never ``playwright install``). Screenshots land in the
test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from wsss.paths import REPO_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("WSSS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOK = "03_attention.ipynb"
# the probe's flags: no sandbox as root, and no background traffic to a closed network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parameterised(src: Path, dst: Path, **params) -> None:
    """The notebook with its parameters cell overridden (papermill's own injection), not executed."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nbformat.write(parameterize_notebook(load_notebook_node(str(src)), params), dst)


@pytest.fixture()
def lab(tmp_path):
    """A JupyterLab server on a copy of 03_attention at smoke size (explorer on); yields its URL."""
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium (or set WSSS_CHROMIUM to its path)")
    if _playwright() is None:
        pytest.skip("no Playwright for Python: pip install playwright (the system Chromium is used; "
                    "do not run `playwright install`)")
    work = tmp_path / "lab"
    work.mkdir()
    _parameterised(REPO_ROOT / "notebooks" / NOTEBOOK, work / NOTEBOOK, DATA_SIZE="smoke", INTERACTIVE=True,
                   N_PAIRS=3, N_DIAG=0)
    port, token = _free_port(), "wsss-browser-test"
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_RUNS": str(tmp_path / "runs"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter_config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.open_browser=False",
           "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core machine needs more than a minute
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(tmp_path / 'jupyter.log').read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("jupyter lab did not answer within 180 s")
                time.sleep(0.5)
        yield f"{url}/lab/tree/{NOTEBOOK}?token={token}", tmp_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the test is skipped then
    PlaywrightTimeout = TimeoutError


def _figure_src(page) -> str:
    img = page.locator(".widget-output img").first
    img.wait_for(timeout=60_000)
    return img.get_attribute("src") or ""


def _wait_for_new_figure(page, before: str, what: str) -> str:
    for _ in range(120):
        now = _figure_src(page)
        if now and now != before:
            return now
        time.sleep(0.5)
    raise AssertionError(f"the explorer's figure did not change after {what}")


def test_the_explorer_renders_and_every_control_redraws(lab):
    url, tmp = lab
    errors: list[str] = []
    with _playwright()() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(url)
            page.locator(".jp-Notebook").wait_for(timeout=120_000)
            try:  # a fresh server asks which kernel to start: the notebook's own is preselected
                page.locator(".jp-Dialog button.jp-mod-accept").click(timeout=15_000)
            except PlaywrightTimeout:
                pass
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
            page.locator(".widget-dropdown select").first.wait_for(timeout=300_000)
            first = _figure_src(page)
            page.screenshot(path=str(tmp / "explorer.png"), full_page=True)
            body = page.locator(".jp-Notebook").inner_text()
            assert "Error displaying widget" not in body and "VBox(children=" not in body
            selects = page.locator(".widget-dropdown select")
            assert selects.count() == 2 and page.locator(".widget-slider").count() == 2

            selects.nth(0).select_option(index=1)                       # another pair
            after_pair = _wait_for_new_figure(page, first, "choosing another pair")
            classes = selects.nth(1).locator("option").count()
            after_class = after_pair
            if classes > 1:                                             # another class of that pair
                selects.nth(1).select_option(index=1)
                after_class = _wait_for_new_figure(page, after_pair, "choosing another class")
            handle = page.locator(".widget-slider .noUi-handle").first    # the row slider, by keyboard
            handle.focus()
            handle.press("ArrowLeft")
            _wait_for_new_figure(page, after_class, "moving the row slider")
            page.screenshot(path=str(tmp / "explorer_after.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(tmp / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert not errors, errors
