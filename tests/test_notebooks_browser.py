"""A real browser: JupyterLab on localhost, headless Chromium driven by Playwright, opens
``06_results.ipynb`` (parameterised for the smoke run), runs every cell, and checks that the prediction
browser widget renders images and reacts to its sample slider.

Needs Debian's ``chromium`` (``./setup.sh --test`` installs it where the machine allows) and the
``playwright`` Python package; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("STABLEMTL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(smoke_study, tmp_path):
    """A JupyterLab server on localhost rooted in the smoke project, with 06 parameterised for it."""
    import papermill

    _, project, _ = smoke_study
    papermill.execute_notebook(str(ROOT / "notebooks" / "06_results.ipynb"), str(project / "06_results.ipynb"),
                               parameters={"preset": "smoke", "run_name": "smoke"}, prepare_only=True,
                               kernel_name="python3", progress_bar=False)
    port, token = _free_port(), "stablemtl-test-token"
    env = dict(os.environ, STABLEMTL_PROJECT=str(project), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    for name in ("OUTPUT_DIR", "PREPROCESSED_DIR"):
        env.pop(name, None)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={project}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; log: {(tmp_path / 'jupyterlab.log').read_text()}")
                time.sleep(0.5)
        yield f"{url}/lab/tree/06_results.ipynb?token={token}", project
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; "
                                               "./setup.sh --test does it when run as root)")
@pytest.mark.slow
def test_results_notebook_browser_widget_in_jupyterlab(jupyterlab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                  "(./setup.sh --test installs it)")
    url, project = jupyterlab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                          "--disable-background-networking", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector(".jp-Notebook .jp-Cell .jp-InputArea", timeout=90_000)
            # wait for the kernel (status bar "Python 3 (ipykernel) | Idle"), then Run > Run All Cells
            page.get_by_text(re.compile(r"\| Idle$")).first.wait_for(timeout=90_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator("li[data-command='runmenu:run-all']").click()
            image = page.locator(".widget-image").nth(2)  # input, ground truth, prediction, error
            image.wait_for(state="visible", timeout=180_000)
            page.wait_for_function("() => { const i = document.querySelectorAll('.widget-image');"
                                   " return i.length >= 4 && [...i].every(x => x.complete && x.naturalWidth > 0); }",
                                   timeout=60_000)
            caption = page.locator(".widget-html-content code").last
            first_caption = page.locator(".widget-html-content", has_text="sample 0").last.inner_text()
            first_src = image.get_attribute("src")
            assert "sample 0" in first_caption
            # move the sample slider one step with the keyboard, as a user would
            handle = page.locator(".widget-slider .noUi-handle").first
            handle.focus()
            handle.press("ArrowRight")
            page.locator(".widget-html-content", has_text="sample 1").last.wait_for(timeout=60_000)
            page.wait_for_function(f"() => document.querySelectorAll('.widget-image')[2].src !== {first_src!r}",
                                   timeout=60_000)
            assert caption.inner_text()  # the sample id is shown
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']").count() == 0, \
                errors.all_inner_texts()
        finally:
            browser.close()
    assert (project / "results" / "smoke" / "summary.md").is_file()
