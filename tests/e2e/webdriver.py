"""A small W3C WebDriver client for Debian's chromium + chromedriver (headless), for e2e tests.

Starts chromedriver on a free loopback port with a fresh profile directory, opens one session,
and offers what the status-page tests need: navigate, page source, text of elements found by CSS,
a PNG screenshot, and the browser's console log (CSP violations show up there). ``close()`` ends
the session and the chromedriver process it started (by its pid)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def browser_missing() -> str:
    """Why a browser test cannot run here ("" if it can)."""
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian packages chromium, chromium-driver: scripts/install.sh)"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    def __init__(self, profile: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            ["chromedriver", f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status")["value"]["ready"]:
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": shutil.which("chromium"),
                        "args": [*CHROME_FLAGS, f"--user-data-dir={profile}"],
                    },
                    "goog:loggingPrefs": {"browser": "ALL"},
                }
            }
        }
        try:
            self.session = self._call("POST", "/session", caps)["value"]["sessionId"]
        except Exception:
            self.close()
            raise

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,  # noqa: S310 (loopback)
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310
                out: dict[str, Any] = json.loads(r.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"webdriver {method} {path}: {err.read()[:500]!r}") from None
        return out

    def _s(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)["value"]

    def get(self, url: str) -> None:
        self._s("POST", "/url", {"url": url})

    def source(self) -> str:
        return str(self._s("GET", "/source"))

    def title(self) -> str:
        return str(self._s("GET", "/title"))

    def texts(self, css: str) -> list[str]:
        found = self._s("POST", "/elements", {"using": "css selector", "value": css})
        return [str(self._s("GET", f"/element/{e[ELEMENT]}/text")) for e in found]

    def attributes(self, css: str, name: str) -> list[str]:
        found = self._s("POST", "/elements", {"using": "css selector", "value": css})
        return [str(self._s("GET", f"/element/{e[ELEMENT]}/attribute/{name}")) for e in found]

    def click(self, css: str) -> None:
        found = self._s("POST", "/element", {"using": "css selector", "value": css})
        self._s("POST", f"/element/{found[ELEMENT]}/click", {})

    def current_url(self) -> str:
        return str(self._s("GET", "/url"))

    def screenshot(self, path: Path) -> int:
        png = base64.b64decode(self._s("GET", "/screenshot"))
        path.write_bytes(png)
        return len(png)

    def console(self) -> list[str]:
        """Browser console entries since the last call (CSP violations, errors)."""
        entries = self._s("POST", "/se/log", {"type": "browser"})
        return [str(e.get("message", "")) for e in entries]

    def close(self) -> None:
        try:
            if getattr(self, "session", None):
                self._call("DELETE", f"/session/{self.session}")
        except Exception:  # noqa: S110 (best effort; the process is ended below)
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
