"""The command line the atheris fuzz scripts share (``scripts/fuzz_pdu.py``, ``fuzz_part10.py``).

Each script instruments its imports, defines its target and its seeds, and hands them to
:func:`run`, which parses the options, writes the seeds or runs libFuzzer over the seed corpus.
The scripts run as ``python scripts/fuzz_*.py``, so this folder is ``sys.path[0]`` for them.

The seed corpus (``tests/fuzz_corpus/<target>``) is written by ``--write-seeds``; inputs the
fuzzer finds interesting go to ``--work`` (a temporary folder unless given), crash inputs to
``--artifacts``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris


def write_seeds(folder: Path, seeds: dict[str, bytes], suffix: str = "") -> None:
    """(Re)write the seed corpus: one file per seed, named after it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (folder / f"{name}{suffix}").write_bytes(data)


def run(
    name: str,
    doc: str | None,
    *,
    seed_folder: Path,
    one_input: Callable[[bytes], None],
    seeds: Callable[[], dict[str, bytes]],
    seed_suffix: str = "",
    rss_limit_mb: int,
    max_len: int,
    quiet_loggers: Iterable[str] = (),
) -> None:
    """Parse the fuzz script's options (its ``doc``'s first paragraph is the description), then
    write the seeds (``--write-seeds``) or fuzz ``one_input`` from ``seed_folder``.

    ``name`` names the default artifact folder and the temporary corpus; ``rss_limit_mb`` and
    ``max_len`` are the script's defaults for those options.
    """
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="stop after this long (default 60)")
    parser.add_argument("--runs", type=int, default=-1, help="stop after this many inputs")
    parser.add_argument("--work", type=Path, help="where new interesting inputs go (default: temp)")
    parser.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / name)
    parser.add_argument("--timeout", type=int, default=5, help="seconds one input may take")
    parser.add_argument("--rss-limit-mb", type=int, default=rss_limit_mb)
    parser.add_argument("--max-len", type=int, default=max_len, help="largest input (bytes)")
    parser.add_argument(
        "--write-seeds", action="store_true", help=f"(re)write {seed_folder} and exit"
    )
    args = parser.parse_args()
    if args.write_seeds:
        write_seeds(seed_folder, seeds(), seed_suffix)
        return
    for logger in quiet_loggers:
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")  # pydicom warns on every invalid value the mutator makes
    work = args.work or Path(tempfile.mkdtemp(prefix=f"{name}_corpus_"))
    work.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    libfuzzer = [
        sys.argv[0],
        str(work),
        str(seed_folder),
        f"-max_total_time={args.seconds}",
        f"-runs={args.runs}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-max_len={args.max_len}",
        f"-artifact_prefix={args.artifacts}/",
        "-print_final_stats=1",
    ]
    print(f"corpus: {work} (seeds {seed_folder}); crash artifacts: {args.artifacts}", flush=True)
    atheris.Setup(libfuzzer, one_input)
    atheris.Fuzz()
