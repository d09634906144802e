"""The results CSVs: one writer keyed by configuration, the run's metadata, shared options.

Every benchmark appends rows to one CSV per script in ``benchmarks/results/``. A row holds
the run's metadata (:func:`metadata`: date, commit, device, versions, threads, a run id),
the columns that name its configuration (the CSV's *key*) and its figures. Rows are
appended one at a time as they are measured, so a run that is killed keeps what it
measured; a file is never rewritten except once to add new columns. A later row with the
same key supersedes an earlier one for readers (:meth:`ResultsCSV.latest`); nothing is
deleted.

Merging rows measured elsewhere (e.g. returned from a GPU machine)::

    python -m benchmarks.results merge benchmarks/results/loss_overhead.csv <folder>/loss_overhead.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from experiments.provenance import COMMIT_ENV, collect_environment

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
#: Metadata columns, first in every CSV.
META_FIELDS = ["date", "commit", "device", "torch", "triton", "timm", "python", "threads", "run_id"]


def metadata(device: torch.device) -> dict[str, Any]:
    """Columns every row of one run shares: ``experiments/provenance.py``'s ``collect_environment`` (the
    commit from ``$D2SM_COMMIT`` when set, else this checkout's, ``+dirty`` when tracked
    files differ) and a fresh ``run_id``."""
    info = collect_environment(device, repo=REPO_ROOT)
    row: dict[str, Any] = {name: info.get(name, "") for name in META_FIELDS}
    row["threads"] = torch.get_num_threads()
    row["run_id"] = uuid.uuid4().hex[:12]
    return row


def read_rows(path: Path) -> list[dict[str, str]]:
    """Every row of the CSV at ``path`` in file order (none when it does not exist)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: Sequence[dict[str, Any]], fieldnames: Sequence[str]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new or empty).

    Rows are written in the file's own column order. When ``fieldnames`` holds columns the
    file lacks, the file is rewritten once, atomically (a temporary file renamed over it),
    with the union of the columns; older rows read empty in the new ones. Cheap enough per
    row: a killed run keeps what it measured.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_fields: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            old_fields = next(csv.reader(f), [])
    fields = old_fields or list(fieldnames)
    missing = [name for name in fieldnames if name not in old_fields]
    if old_fields and missing:
        old_rows = read_rows(path)
        fields = old_fields + missing
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(old_rows)
        os.replace(tmp, path)
    with open(path, "a" if old_fields else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if not old_fields:
            writer.writeheader()
        writer.writerows(rows)


class ResultsCSV:
    """One results file: its columns and the columns that name a configuration (``key``).

    ``write(row)`` appends one row at once and checks that every key column is set;
    ``latest()`` gives the newest row of each configuration.
    """

    def __init__(self, path: Path, fields: Sequence[str], key: Sequence[str]) -> None:
        unknown = [name for name in key if name not in fields]
        if unknown:
            raise ValueError(f"key columns {unknown} are not among the fields")
        self.path, self.fields, self.key = Path(path), list(fields), tuple(key)
        self.written: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        missing = [name for name in self.key if row.get(name) in (None, "")]
        if missing:
            raise ValueError(f"row for {self.path.name} lacks key column(s) {missing}: {row}")
        append_rows(self.path, [row], self.fields)
        self.written.append(row)
        return row

    def rows(self) -> list[dict[str, str]]:
        return read_rows(self.path)

    def latest(self) -> list[dict[str, str]]:
        return latest_rows(self.rows(), self.key)


def latest_rows(rows: Iterable[dict[str, str]], key: Sequence[str]) -> list[dict[str, str]]:
    """The last row (file order: the newest run) for each value of the ``key`` columns."""
    latest: dict[tuple, dict[str, str]] = {}
    for row in rows:
        latest[tuple(row.get(k, "") for k in key)] = row
    return list(latest.values())


def newest_run(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of the run that wrote the last of ``rows`` (all of them when there is no run id)."""
    if not rows or not rows[-1].get("run_id"):
        return list(rows)
    run_id = rows[-1]["run_id"]
    return [row for row in rows if row.get("run_id") == run_id]


def merge_csv(source: Path, target: Path) -> int:
    """Append every row of the CSV ``source`` to ``target`` (columns united); rows moved."""
    rows = read_rows(source)
    if rows:
        append_rows(target, rows, list(rows[0]))
    return len(rows)


def as_float(value: Any) -> float:
    """``float(value)``, NaN for an empty or unreadable cell."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def error_status(error: BaseException) -> str:
    """``"error: <Type>: <first line of the message>"`` (a row's status)."""
    text = str(error).strip().splitlines()
    return f"error: {type(error).__name__}: {text[0] if text else ''}".rstrip(": ").rstrip()


# --- options every measuring script shares ---------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser, csv_name: str) -> None:
    """``--out``, ``--device``, ``--note`` and ``--commit``."""
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help=f"folder of {csv_name}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--note", default="", help="free text stored with every row of this run")
    parser.add_argument("--commit", default=None,
                        help=f"commit recorded in every row (default: ${COMMIT_ENV}, else git rev-parse in this "
                             "checkout, else 'unknown'); for a copy without .git")


def start_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[torch.device, dict[str, Any]]:
    """The device (``auto``: CUDA when available, the CPU for ``--quick``) and the run's metadata."""
    if args.commit:
        os.environ[COMMIT_ENV] = args.commit
    requested = "cpu" if getattr(args, "quick", False) and args.device == "auto" else args.device
    on_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    device = torch.device("cuda" if on_cuda else "cpu")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    return device, metadata(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Append the rows of result CSVs to a target CSV.")
    parser.add_argument("command", choices=("merge",))
    parser.add_argument("target", type=Path)
    parser.add_argument("sources", type=Path, nargs="+")
    args = parser.parse_args(argv)
    for source in args.sources:
        print(f"{source}: {merge_csv(source, args.target)} rows appended to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
