"""A headless Chromium page driven through ``driver.mjs`` (playwright-core), one command at a time."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.viewer.assets import CHROMIUM, playwright_core

DRIVER = Path(__file__).with_name("driver.mjs")


class BrowserError(RuntimeError):
    """The page refused a command (the message is playwright's)."""


class Browser:
    """One Chromium page. Every call blocks until the driver answers or ``timeout`` passes."""

    def __init__(
        self, *, width: int = 1400, height: int = 900, http_credentials: tuple[str, str] | None = None
    ) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not installed (Debian package nodejs / npm)")
        if not os.access(CHROMIUM, os.X_OK):
            raise RuntimeError(f"{CHROMIUM} not found (Debian package chromium)")
        options: dict[str, Any] = {"executablePath": CHROMIUM, "viewport": {"width": width, "height": height}}
        if http_credentials is not None:  # answered to HTTP basic challenges (the dashboard)
            options["httpCredentials"] = {"username": http_credentials[0], "password": http_credentials[1]}
        env = {**os.environ, "NODE_PATH": str(playwright_core())}
        self.proc = subprocess.Popen(
            [node, str(DRIVER), json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )

    def call(self, cmd: str, *, timeout: float = 90.0, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"browser command {cmd!r} gave no answer within {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise BrowserError(f"the browser driver exited: {err[-2000:]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise BrowserError(f"{cmd}: {answer['error']}")
        return answer["result"]

    def goto(self, url: str) -> None:
        self.call("goto", url=url)

    def wait(self, selector: str, timeout_ms: int = 60000) -> None:
        self.call("wait", selector=selector, ms=timeout_ms, timeout=timeout_ms / 1000 + 15)

    def wait_for(self, expr: str, timeout_ms: int = 60000) -> None:
        """Wait until the JavaScript expression ``expr`` is truthy in the page."""
        self.call("wait_for", expr=expr, ms=timeout_ms, timeout=timeout_ms / 1000 + 15)

    def eval(self, expr: str) -> Any:
        return self.call("eval", expr=expr)

    def screenshot(self, path: Path) -> Path:
        self.call("screenshot", path=str(path))
        return path

    def console(self) -> list[dict[str, str]]:
        return list(self.call("console"))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrowserError, TimeoutError, BrokenPipeError, OSError):
                self.call("close", timeout=30)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
