"""Command plug-ins (the ``dicom_node.commands`` entry points) that fail to load, as a user meets
them: ``dicom-node`` in a subprocess, with a real broken package on its path.

A plug-in that cannot be imported is a warning naming the plug-in and the exception, its command
says why when it is run (not click's "No such command"), and every other command still works.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.peers import REPO


def dicom_node(*args: str, path: list[Path]) -> subprocess.CompletedProcess[str]:
    """``dicom-node ARGS`` with ``path`` ahead of the repository on the module search path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path), str(REPO)])
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=path[0],
    )


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_worker_plugin_that_cannot_be_imported_says_so(tmp_path: Path) -> None:
    # Somebody else's top-level package called `workers`, earlier on the path, written for
    # another version of typer: importing `workers.cli.worker` fails with a real ImportError.
    shadow = _write(
        tmp_path / "shadow",
        {"workers/__init__.py": "from typer import TyperPluginV9  # not in this typer\n"},
    )
    expected = "ImportError: cannot import name 'TyperPluginV9' from 'typer'"

    # --help first: it starts nothing, even if the real plug-in were loaded after all.
    listing = dicom_node("--help", path=[shadow])
    assert listing.returncode == 0, listing.stderr
    assert "Not available" in listing.stdout
    assert "evaluate" in listing.stdout and "echo" in listing.stdout
    # logged as a warning at start-up, naming the plug-in and the exception
    assert (
        f"command plug-in 'worker' (workers.cli.worker:register) could not be loaded: {expected}"
    ) in listing.stderr

    run = dicom_node("worker", "--queues", "gpu", "--concurrency", "1", path=[shadow])
    assert run.returncode == 2, run.stderr
    assert "No such command" not in run.stderr
    assert (
        f"error: the worker plug-in (workers.cli.worker:register) could not be loaded: {expected}"
    ) in run.stderr
    assert "pip install" not in run.stderr  # not a missing extra: no advice to install one

    asked_for_help = dicom_node("worker", "--help", path=[shadow])
    assert asked_for_help.returncode == 2
    assert "the worker plug-in (workers.cli.worker:register) could not be loaded" in (
        asked_for_help.stderr
    )

    other = dicom_node("synth", "--help", path=[shadow])
    assert other.returncode == 0, other.stderr


def test_a_plugin_that_raises_on_import_leaves_the_other_commands_working(tmp_path: Path) -> None:
    # A third-party plug-in package, installed the way pip leaves one (a .dist-info with its
    # entry points), whose import raises something other than ImportError.
    site = _write(
        tmp_path / "site",
        {
            "acme_gpu_cli.py": 'raise RuntimeError("CUDA driver version is insufficient")\n',
            "acme_gpu_cli-1.0.dist-info/METADATA": (
                "Metadata-Version: 2.1\nName: acme-gpu-cli\nVersion: 1.0\n"
            ),
            "acme_gpu_cli-1.0.dist-info/entry_points.txt": (
                "[dicom_node.commands]\nacme = acme_gpu_cli:register\n"
            ),
        },
    )

    run = dicom_node("acme", path=[site])
    assert run.returncode == 2, run.stderr
    assert (
        "error: the acme plug-in (acme_gpu_cli:register) could not be loaded: "
        "RuntimeError: CUDA driver version is insufficient"
    ) in run.stderr
    assert "Traceback" not in run.stderr

    echo = dicom_node("echo", "--help", path=[site])
    assert echo.returncode == 0, echo.stderr
    assert "command plug-in 'acme' (acme_gpu_cli:register) could not be loaded" in echo.stderr


def test_a_command_missing_an_optional_package_names_it(tmp_path: Path) -> None:
    # The compute commands import torch only when they run; without the worker extra that
    # import fails there. A plug-in that does the same with a package that is not installed:
    site = _write(
        tmp_path / "site",
        {
            "acme_needs.py": (
                "def register(app):\n"
                "    @app.command()\n"
                "    def acme() -> None:\n"
                "        import acme_not_installed_anywhere  # noqa: F401\n"
            ),
            "acme_needs-1.0.dist-info/METADATA": (
                "Metadata-Version: 2.1\nName: acme-needs\nVersion: 1.0\n"
            ),
            "acme_needs-1.0.dist-info/entry_points.txt": (
                "[dicom_node.commands]\nacme = acme_needs:register\n"
            ),
        },
    )

    run = dicom_node("acme", path=[site])
    assert run.returncode == 2, run.stderr
    assert "'acme_not_installed_anywhere', which is not installed" in run.stderr
    assert "pip install 'dicom-node[worker]'" in run.stderr
    assert "Traceback" not in run.stderr
    assert "could not be loaded" not in run.stderr  # the plug-in itself loaded fine
