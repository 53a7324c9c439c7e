"""The benchmarks' Markdown tables, and the JSON-lines file their rows stream into (no torch import: the GPU
check's report reads them too).

Every row is printed the moment it is measured and, when ``DDPM_BENCH_RESULTS`` names a file, appended to
it as one JSON line, so a benchmark stopped half-way (bench/gpu_check.sh stops a step at its time cap)
still leaves what it measured. At the end a benchmark prints the whole table again, aligned.
"""
import json
import os
import sys
from pathlib import Path

RESULTS_ENV = "DDPM_BENCH_RESULTS"


def markdown(cols: list[str], lines: list[list]) -> list[str]:
    """A Markdown table with aligned columns (pastes into docs/PERFORMANCE.md as is)."""
    widths = [max(len(str(c)) for c in col) for col in zip(cols, *lines)]
    return (["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
            + ["| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |" for cells in lines])


class Table:
    """One benchmark table: ``add()`` prints a row at once (the header before the first) and appends it to
    $DDPM_BENCH_RESULTS; ``print_final()`` prints the whole table, aligned."""

    def __init__(self, title: str, cols: list[str]):
        self.title, self.cols, self.lines = title, cols, []

    def add(self, cells: list, values: dict | None = None) -> None:
        """One row: its cells as shown, and ``values`` (numbers unformatted) for machine readers."""
        cells = [str(c) for c in cells]
        if not self.lines:
            print("| " + " | ".join(self.cols) + " |\n|" + "---|" * len(self.cols))
        self.lines.append(cells)
        print("| " + " | ".join(cells) + " |", flush=True)
        path = os.environ.get(RESULTS_ENV)
        if path:  # opened and closed per row: a process killed later loses no finished row
            record = {"bench": Path(sys.argv[0]).stem, "table": self.title, "columns": self.cols, "cells": cells,
                      "values": values or {}}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def print_final(self) -> None:
        print("\n".join(markdown(self.cols, self.lines)))


def read_rows(path) -> list[dict]:
    """The rows appended to a results file, in order; a line cut short by a killed writer is left out."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
