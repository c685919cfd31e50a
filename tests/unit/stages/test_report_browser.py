"""``hpc-dfs report`` read as a person reads it: rendered in real headless Chromium, looked at, offline.

The page of a real (tiny) train -> predict -> evaluate chain is opened in Chromium, driven over the
DevTools protocol (``--remote-debugging-pipe``: JSON messages on file descriptors 3 and 4, no Python
package needed). The test records every request the page makes (``Network.requestWillBeSent``) and
asserts that none leaves the machine (only ``file:`` and ``data:`` URLs), that every image decodes
(``naturalWidth > 0``), that the title, the warnings box and the sections render, and it writes a
full-page screenshot (``report_screenshot.png``, path printed) that a person can look at. A control
page with one remote image proves the request check can fail.

Chromium comes from apt (``apt-get install -y chromium``), installed here when missing and root is
available; CI runs as root. Without it the test fails under CI and is skipped elsewhere.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hpc_dfs.cli import main as cli
from tests.unit.stages.test_report import chain  # noqa: F401  (the module-scoped fixture: a real tiny run)

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")


def _find_browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


@pytest.fixture(scope="module")
def browser() -> str:
    """Path of a Chromium binary; apt-get installs it when missing (root only)."""
    found = _find_browser()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
        found = _find_browser()
    if found is None:
        why = "Chromium is not installed and could not be installed with apt-get (needs root)"
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)
    return found


class DevTools:
    """A minimal Chrome DevTools protocol client over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def wire():  # in the child: the browser reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)  # above 4, whatever numbers the pipes got
            os.dup2(a, 3)  # os.dup2 makes the copies inheritable across exec
            os.dup2(b, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no reply from the browser")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method and e.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            e = self._read_message(deadline)
            if e.get("method") == method and e.get("sessionId") == session:
                return e
            self.events.append(e)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


def open_page(binary: str, page: Path, profile: Path, width: int = 1280) -> dict:
    """Load ``page`` in headless Chromium; return its requests, DOM facts and a full-page PNG screenshot."""
    dt = DevTools(binary, profile)
    try:
        target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        dt.send("Network.enable", session=s)
        dt.send("Page.enable", session=s)
        dt.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                       "mobile": False}, session=s)
        dt.send("Page.navigate", {"url": page.resolve().as_uri()}, session=s)
        dt.wait_event("Page.loadEventFired", s, timeout=120)
        facts = json.loads(dt.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify({
            title: document.title, h1: (document.querySelector('h1') || {}).innerText || '',
            h2: Array.from(document.querySelectorAll('h2')).map(h => h.innerText),
            warnings: Array.from(document.querySelectorAll('#warnings li')).map(li => li.innerText),
            images: document.images.length,
            broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length,
            text: document.body.innerText, height: document.documentElement.scrollHeight})"""},
                                   session=s)["result"]["value"])
        height = min(int(facts["height"]), 16000)
        shot = dt.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                  "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                                           "scale": 1}}, session=s, timeout=120)
        requests = [e["params"]["request"]["url"] for e in dt.events if e.get("method") == "Network.requestWillBeSent"
                    and e.get("sessionId") == s]
    finally:
        dt.close()
    return {"requests": requests, "external": [u for u in requests if not u.startswith(LOCAL_SCHEMES)],
            "png": base64.b64decode(shot["data"]), **facts}


def test_request_check_can_fail(browser, tmp_path):
    """Control: a page with one remote image and one remote stylesheet is caught by the request check."""
    page = tmp_path / "control.html"
    page.write_text("<!DOCTYPE html><html><head><title>control</title>"
                    "<link rel='stylesheet' href='https://fonts.example.org/a.css'></head>"
                    "<body><h1>control</h1><img src='http://example.com/x.png'></body></html>")
    got = open_page(browser, page, tmp_path / "profile")
    assert any("example.com/x.png" in u for u in got["external"]), got["requests"]
    assert any("fonts.example.org" in u for u in got["external"]), got["requests"]
    assert got["broken"] == 1 and got["h1"] == "control"


def test_report_renders_offline_in_chromium(browser, chain, tmp_path):  # noqa: F811 (the imported fixture)
    out = tmp_path / "report.html"
    assert cli(["report", str(chain["run"]), "--clinical", str(chain["clin"]), "--shards",
                str(chain["setup"]["shards"]), "--out", str(out)]) == 0
    got = open_page(browser, out, tmp_path / "profile")
    shot = tmp_path / "report_screenshot.png"
    shot.write_bytes(got["png"])
    print(f"\nreport screenshot: {shot} ({len(got['png']) / 1024:.0f} kB, page height {got['height']} px)")
    assert got["external"] == [], f"the report made requests off the machine: {got['external']}"
    assert got["requests"] and got["requests"][0].startswith("file:")  # the page itself was loaded
    assert got["images"] >= 4 and got["broken"] == 0, got
    n_epochs = sum(1 for line in (chain["run"] / "metrics.jsonl").read_text().splitlines() if line.strip())
    assert f"{n_epochs} epochs" in got["h1"] and "run report: run" not in got["title"]
    for title in ("Run", "Data", "Training curves", "Validation metrics", "Evaluation", "Best and worst cases",
                  "Prediction", "Clinical model"):
        assert title in got["h2"], (title, got["h2"])
    assert any("validation metrics are over" in w for w in got["warnings"]), got["warnings"]
    assert "tumour detection" in got["text"] and "epochs trained" in got["text"]
    from PIL import Image
    img = Image.open(shot)
    assert img.size[0] == 1280 and img.size[1] > 2000
    colours = img.convert("RGB").resize((128, img.size[1] // 10)).getcolors(1 << 20)
    assert colours is not None and len(colours) > 200  # pictures and text rendered, not a blank page
