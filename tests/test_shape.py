"""The shape of the code stays visible in the tree.

* the edge (``dicom_node``) never imports the compute side: ``workers``, torch or any other
  package of the ``worker`` extra, not even lazily inside a function;
* nothing imports upwards: each module of ``dicom_node`` and ``workers`` sits in a layer
  (below), and imports only from its own layer and the layers beneath it;
* a module over :data:`MAX_LINES` lines is listed in :data:`LONG_MODULES`, with the reason it is
  still one thing.

Read from the source with :mod:`ast` (nothing is imported), so the whole file runs in well
under a second.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("dicom_node", "workers")
"""The packages the wheel contains (``[tool.setuptools.packages.find]`` in pyproject.toml)."""

NOT_SHIPPED = ("training", "benchmarks", "tests", "scripts")
"""Folders of the checkout that an installed node does not have: nothing shipped imports them."""

# The modules a `worker` extra package installs, by distribution name. The edge imports none of
# them; a package added to the extra must be added here (test_worker_extra_is_mapped).
WORKER_EXTRA_IMPORTS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "highdicom": ("highdicom",),
    "scipy": ("scipy",),
    "matplotlib": ("matplotlib", "mpl_toolkits", "pylab"),
    "pylibjpeg": ("pylibjpeg",),
    "pylibjpeg-openjpeg": ("openjpeg",),
    "pylibjpeg-rle": ("rle",),
    "pyjpegls": ("jpeg_ls",),
    "python-gdcm": ("gdcm",),
    "pyyaml": ("yaml",),
}

# Layers, lowest first, as (name, top-level modules of the package). A module imports from its
# own layer and the ones below, never above: the vocabulary knows nothing of configuration or
# storage, those know nothing of the services built on them, and the services nothing of the
# entry points (HTTP API, DICOM listener, CLI, process supervisor) that drive them. A new
# module goes into the layer its job belongs to; this test fails until it has one.
EDGE_LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    # errors, DIMSE status codes, what counts as patient data, UID derivation (and the package's
    # __init__, which holds only the version)
    # and the background-thread base of serve's components
    ("vocabulary", frozenset({"__init__", "errors", "dimse_status", "phi", "uids", "background"})),
    # the settings object, the state database, the spool and the result store, bounded Part 10
    # reading, image geometry from headers, TLS contexts
    (
        "foundation",
        frozenset({"settings", "state", "spool", "results_store", "dataset_io", "geometry", "tls"}),
    ),
    # what the node does: ingest, completion, routing, dispatch, delivery, audit, metrics, ...
    (
        "services",
        frozenset(
            {
                "alerts",
                "association_outcome",
                "atna",
                "audit",
                "backfill",
                "broker",
                "completion",
                "delivery",
                "dicomweb",
                "dispatch",
                "embedded",
                "ingest",
                "jobs",
                "logs",
                "loop",
                "metrics",
                "model_catalog",
                "preview",
                "reconcile",
                "retention",
                "routing",
                "scu",
                "study_lookup",
                "supervision",
                "synth",
            }
        ),
    ),
    # what a user or a peer starts or talks to
    (
        "entry points",
        frozenset({"api", "scp", "cli", "service", "components", "demo", "__main__"}),
    ),
)

WORKER_LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    # what a detector sees and says: the volume (its pixel decoding and uniform grid), where a
    # study is read from, findings
    ("data", frozenset({"__init__", "findings", "volume", "pixels", "grid", "source"})),
    # models, series selection, result encoding, the model runtime, offline evaluation
    ("compute", frozenset({"models", "selection", "results", "runtime", "evaluate"})),
    # one job end to end, putting its results in the node's store, and the Celery app
    ("orchestration", frozenset({"pipeline", "storage", "celery_app"})),
    # the `dicom-node worker` / `evaluate` commands (entry-point plug-ins)
    ("entry points", frozenset({"cli"})),
)

EDGE_ENTRY_POINTS = frozenset(f"dicom_node.{name}" for name in EDGE_LAYERS[-1][1])
"""What workers never import (it would pull the HTTP app or the listener into a worker), except
that the command plug-ins in ``workers.cli`` are commands of ``dicom_node.cli``."""

MAX_LINES = 400
# Modules over MAX_LINES lines, each with the reason it is one cohesive thing.
LONG_MODULES: dict[str, str] = {
    "dicom_node/settings.py": "the one settings object: every section, its validation and loading",
    "dicom_node/dataset_io.py": "bounded Part 10 reading: the one place that inflates and sizes data",
    "dicom_node/metrics.py": "one /metrics page: multiprocess receiver counters + job metrics",
    "dicom_node/scp/reactor.py": "mirrors pynetdicom's reactor loop and PDU reader, one to one",
    "dicom_node/api/routes/dicomweb.py": "the node's DICOMweb routes: STOW-RS, WADO-RS, QIDO-RS",
    "dicom_node/dicomweb/stow_receiver.py": "one STOW-RS request: multipart stream to PS3.18 answer",
    "workers/models/lung_nodules.py": "the built-in detector's stages 1-5, in the order they run",
    "workers/models/torchscript.py": "a TorchScript model folder: card schema, checks, pre/post",
    "workers/results/conformance.py": "the conformance gate: every rule an output object must meet",
}


@dataclass(frozen=True)
class Import:
    """One import statement (or constant ``importlib.import_module``) in one module."""

    path: str
    line: int
    target: str
    """The module imported; for ``from m import n`` also ``m.n`` (which may be a module)."""


def _module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def _is_import_call(node: ast.Call) -> bool:
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
    )


def _imports(path: Path, root: Path = REPO) -> Iterator[Import]:
    """Every import in ``path``, at any depth (lazy imports inside functions included)."""
    rel = str(path.relative_to(root))
    package = _module_name(path, root).split(".")[:-1]  # __init__ is a module of its package
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(rel, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield Import(rel, node.lineno, module)
            for alias in node.names:
                yield Import(rel, node.lineno, f"{module}.{alias.name}")
        elif isinstance(node, ast.Call) and node.args and _is_import_call(node):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield Import(rel, node.lineno, first.value)


def _sources(package: str, root: Path = REPO) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def _within(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def _top(module: str, package: str) -> str:
    """``dicom_node.api.routes.jobs`` -> ``api`` (the package's top-level module or package)."""
    if module == package:
        return "__init__"
    return module.removeprefix(package + ".").split(".")[0]


Layers = tuple[tuple[str, frozenset[str]], ...]


def _layer_of(layers: Layers, name: str) -> int | None:
    for index, (_, members) in enumerate(layers):
        if name in members:
            return index
    return None


def forbidden_imports(package: str, names: set[str], root: Path = REPO) -> list[str]:
    """``file:line imports target`` for each import in ``package`` of one of ``names``."""
    return [
        f"{imp.path}:{imp.line} imports {imp.target}"
        for path in _sources(package, root)
        for imp in _imports(path, root)
        if any(_within(imp.target, name) for name in names)
    ]


def upward_imports(package: str, layers: Layers, root: Path = REPO) -> list[str]:
    """Each module of ``package`` in no layer, and each import of a module in a higher layer."""
    problems = []
    for path in _sources(package, root):
        own = _layer_of(layers, _top(_module_name(path, root), package))
        if own is None:
            problems.append(f"{path.relative_to(root)} is in no layer of test_shape.py")
            continue
        for imp in _imports(path, root):
            if not _within(imp.target, package):
                continue
            target = _layer_of(layers, _top(imp.target, package))
            if target is not None and target > own:
                problems.append(
                    f"{imp.path}:{imp.line} ({layers[own][0]}) imports {imp.target} "
                    f"({layers[target][0]})"
                )
    return problems


def edge_entry_point_imports(root: Path = REPO) -> list[str]:
    """Imports by ``workers`` of the edge's entry points (``workers.cli`` may use its CLI)."""
    problems = []
    for path in _sources("workers", root):
        plugin = _within(_module_name(path, root), "workers.cli")
        for imp in _imports(path, root):
            if plugin and _within(imp.target, "dicom_node.cli"):
                continue  # the command plug-ins are commands of the edge's CLI
            if any(_within(imp.target, name) for name in EDGE_ENTRY_POINTS):
                problems.append(f"{imp.path}:{imp.line} imports {imp.target}")
    return problems


def long_modules(root: Path = REPO) -> tuple[list[str], list[str]]:
    """Shipped modules over MAX_LINES lines not in LONG_MODULES, and entries no longer needed."""
    lengths = {
        str(path.relative_to(root)): len(path.read_text().splitlines())
        for package in SHIPPED
        for path in _sources(package, root)
    }
    unexplained = sorted(
        f"{path} ({n} lines)"
        for path, n in lengths.items()
        if n > MAX_LINES and path not in LONG_MODULES
    )
    stale = sorted(path for path in LONG_MODULES if lengths.get(path, 0) <= MAX_LINES)
    return unexplained, stale


MONAI_EXTRA_IMPORTS = ("monai", "nibabel")
"""The ``monai`` extra (MONAI bundles, workers/models/bundle): compute side as well."""

COMPUTE_SIDE = {
    "workers",
    *MONAI_EXTRA_IMPORTS,
    *(m for mods in WORKER_EXTRA_IMPORTS.values() for m in mods),
}


def test_the_edge_never_imports_the_compute_side() -> None:
    found = forbidden_imports("dicom_node", COMPUTE_SIDE)
    assert not found, "dicom_node must run without the worker extra:\n" + "\n".join(found)


def test_worker_extra_is_mapped() -> None:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in extra["worker"]}
    assert names == set(WORKER_EXTRA_IMPORTS), "update WORKER_EXTRA_IMPORTS to the worker extra"


@pytest.mark.parametrize(
    ("package", "layers"), [("dicom_node", EDGE_LAYERS), ("workers", WORKER_LAYERS)]
)
def test_nothing_imports_upwards(package: str, layers: Layers) -> None:
    problems = upward_imports(package, layers)
    assert not problems, "\n".join(problems)


def test_workers_use_the_edge_as_a_library() -> None:
    problems = edge_entry_point_imports()
    assert not problems, "workers import an entry point of the edge:\n" + "\n".join(problems)


def test_shipped_code_never_imports_the_checkout() -> None:
    found = [f for package in SHIPPED for f in forbidden_imports(package, set(NOT_SHIPPED))]
    assert not found, "an installed node has no training/, benchmarks/ or tests/:\n" + "\n".join(
        found
    )


def test_long_modules_say_why() -> None:
    unexplained, stale = long_modules()
    assert not unexplained, (
        f"over {MAX_LINES} lines: split them by concept, or add them to LONG_MODULES with the "
        "reason they are one thing:\n" + "\n".join(unexplained)
    )
    assert not stale, "no longer over the limit (remove from LONG_MODULES): " + ", ".join(stale)


def test_each_check_fails_on_a_violation(tmp_path: Path) -> None:
    # A small tree that breaks every rule, in the ways that are easy to miss: a lazy import
    # inside a function, a relative import, importlib with a constant name, a package import.
    files = {
        "dicom_node/__init__.py": "",
        "dicom_node/errors.py": "def f():\n    from .api import app\n",
        "dicom_node/state/__init__.py": "from dicom_node import cli\n",
        "dicom_node/api/__init__.py": "",
        "dicom_node/cli.py": "import importlib\nimportlib.import_module('workers.volume')\n",
        "dicom_node/newthing.py": "def g():\n    import torch.nn\n",
        "dicom_node/spool.py": "import training.train_fp_reduction\n" + "x = 1\n" * MAX_LINES,
        "workers/__init__.py": "",
        "workers/volume.py": "from workers.pipeline import run\n",
        "workers/pipeline.py": "from dicom_node.api.job_views import get_job\n",
        "workers/cli/__init__.py": "from dicom_node.cli import state\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    assert forbidden_imports("dicom_node", COMPUTE_SIDE, tmp_path) == [
        "dicom_node/cli.py:2 imports workers.volume",
        "dicom_node/newthing.py:2 imports torch.nn",
    ]
    assert upward_imports("dicom_node", EDGE_LAYERS, tmp_path) == [
        "dicom_node/errors.py:2 (vocabulary) imports dicom_node.api (entry points)",
        "dicom_node/errors.py:2 (vocabulary) imports dicom_node.api.app (entry points)",
        "dicom_node/newthing.py is in no layer of test_shape.py",
        "dicom_node/state/__init__.py:1 (foundation) imports dicom_node.cli (entry points)",
    ]
    assert upward_imports("workers", WORKER_LAYERS, tmp_path) == [
        "workers/volume.py:1 (data) imports workers.pipeline (orchestration)",
        "workers/volume.py:1 (data) imports workers.pipeline.run (orchestration)",
    ]
    assert edge_entry_point_imports(tmp_path) == [
        "workers/pipeline.py:1 imports dicom_node.api.job_views",
        "workers/pipeline.py:1 imports dicom_node.api.job_views.get_job",
    ]
    assert forbidden_imports("dicom_node", set(NOT_SHIPPED), tmp_path) == [
        "dicom_node/spool.py:1 imports training.train_fp_reduction"
    ]
    unexplained, stale = long_modules(tmp_path)
    assert unexplained == [f"dicom_node/spool.py ({MAX_LINES + 1} lines)"]
    assert "dicom_node/settings.py" in stale
