"""The dashboard in a real browser: `tune dashboard` serves it, headless Chromium renders it.

Chromium is driven through its DevTools protocol over a websocket (the `websockets` package comes
with streamlit), because the page is drawn by JavaScript after a websocket round trip to the server:
`chromium --dump-dom` alone returns the empty shell. Skipped where no chromium binary is installed
(.ci/run installs Debian's chromium package). The page load time (server start to the grid in the
DOM) is printed; set DASHBOARD_SCREENSHOT=FILE.png to keep the screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from dashboard_testkit import IMAGES_PER_STEP, LORA_RUN, STEPS

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_for(check: Any, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


class Chromium:
    """Headless Chromium with a DevTools websocket to its one page."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1600,1400",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), 30, "chromium", self.proc)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=10)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def chromium_binary() -> str:
    binary = find_chromium()
    if binary is None:
        why = "no chromium binary on PATH (apt-get install chromium); .ci/run installs it"
        if os.environ.get("TUNE_REQUIRE_BROWSER"):  # CI: a skipped browser test would hide a broken install
            pytest.fail(why)
        pytest.skip(why)
    return binary


def test_dashboard_renders_the_compare_grid_in_chromium(
    runs_root: Path, chromium_binary: str, tmp_path: Path
):
    port = free_port()
    env = {**os.environ, "TUNE_RUNS_DIR": "/nonexistent"}  # --runs must win over the environment
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "tune.cli", "dashboard", "--runs", str(runs_root), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # streamlit and anything it starts stop together below
    )
    browser = None
    try:
        wait_for(lambda: healthy(f"http://localhost:{port}/_stcore/health"), 60, "the server", server)
        server_up = time.monotonic() - started
        # A fresh profile per run; kept short: Chromium's socket paths must stay under ~100 chars.
        profile = Path(tempfile.mkdtemp(prefix="tune-chromium-"))
        browser = Chromium(chromium_binary, profile)
        browser.call("Page.navigate", url=f"http://localhost:{port}/?page=compare&run={LORA_RUN}")
        expected = IMAGES_PER_STEP * len(STEPS)
        count_grid = (
            "[...document.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length"
        )
        wait_for(lambda: (browser.evaluate(count_grid) or 0) >= expected, 60, "the grid images")
        loaded = time.monotonic() - started
        dom = browser.evaluate("document.documentElement.outerHTML")
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot = tmp_path / "dashboard.png"
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        if os.environ.get("DASHBOARD_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["DASHBOARD_SCREENSHOT"])
        print(
            f"\nserver up {server_up:.2f} s; page with grid rendered {loaded:.2f} s after start; {screenshot}"
        )

        assert f"Compare · {LORA_RUN}" in dom
        assert "base (step 0)" in dom and "step 200" in dom
        assert "on a red background" in dom
        media = [src for src in browser.evaluate("[...document.images].map(i => i.src)") if "/media/" in src]
        assert len(media) >= expected  # the grid (+ concept photos), served by streamlit's media endpoint
        assert screenshot.stat().st_size > 10_000
    finally:
        if browser is not None:
            browser.close()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
