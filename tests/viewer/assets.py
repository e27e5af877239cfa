"""Fetch (once) what the viewer test needs into ``tests/.cache``: OHIF's prebuilt static build
(``npm pack @ohif/app``) and ``playwright-core`` (no browser download: Debian's chromium is used).

Run ``python -m tests.viewer.assets`` to prefetch; the viewer fixtures call the same functions.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OHIF_VERSION = "3.13.2"
PLAYWRIGHT_CORE_VERSION = "1.65.1"
CACHE = Path(__file__).resolve().parents[1] / ".cache"
CHROMIUM = "/usr/bin/chromium"


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise fetches between concurrent test processes."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".{name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (Debian package npm; scripts/bootstrap --test installs it)")
    return npm


def ohif_dist() -> Path:
    """``dist/`` of ``@ohif/app`` at :data:`OHIF_VERSION`, fetched with ``npm pack`` if missing."""
    target = CACHE / f"ohif-{OHIF_VERSION}"
    dist = target / "dist"
    if (dist / "index.html").is_file():
        return dist
    with _locked("ohif"):
        if (dist / "index.html").is_file():
            return dist
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            subprocess.run(
                [_npm(), "pack", f"@ohif/app@{OHIF_VERSION}", "--silent"],
                cwd=tmp, check=True, capture_output=True, timeout=600,
            )
            (tgz,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tgz) as tar:
                tar.extractall(tmp, filter="data")
            staged = Path(tmp) / "package"
            if not (staged / "dist" / "index.html").is_file():
                raise RuntimeError("the @ohif/app package has no dist/index.html")
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
    return dist


def playwright_core() -> Path:
    """The ``node_modules`` folder holding ``playwright-core`` (installed without browsers)."""
    prefix = CACHE / f"playwright-core-{PLAYWRIGHT_CORE_VERSION}"
    modules = prefix / "node_modules"
    if (modules / "playwright-core" / "package.json").is_file():
        return modules
    with _locked("playwright"):
        if not (modules / "playwright-core" / "package.json").is_file():
            prefix.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [_npm(), "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(prefix),
                 f"playwright-core@{PLAYWRIGHT_CORE_VERSION}"],
                check=True, capture_output=True, timeout=600,
                env={**_env(), "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
            )
    return modules


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    print(ohif_dist())
    print(playwright_core())
