"""Collapse rate per config cell: how often training broke down over the seeds of the same config.

A run *collapsed* when its final test accuracy is below `COLLAPSE_BELOW` (0.5 on the 10-class tasks, where a
dead model scores 0.1 and a healthy one 0.8-0.9 within a few hundred steps), or when it stopped because the
honest majority was lost (a `majority_lost` event: the protocol could not go on, so training did not finish).
A cell is one value of every varying key but `seed`; `byztrain report` adds the table (`collapse_section`, and
`terminal_lines` for the terminal) whenever some cell has more than one run.

Unfinished runs and runs that failed for another reason are not counted: the cell says how many are missing.
The rate comes with its count (k/n) and a 95 % Wilson score interval, which stays inside [0, 1] and is sound
at the small n (10 seeds) and extreme k (0 or n) these tables have. This module reads the report's `RunData`
objects by their attributes only, so that report.py can import it without a cycle.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

#: final test accuracy below which a run counts as collapsed
COLLAPSE_BELOW = 0.5
#: normal quantile of the Wilson interval (95 %)
WILSON_Z = 1.959963984540054
NUMBER_COLUMNS = (f"collapsed (accuracy < {100 * COLLAPSE_BELOW:g} %)", "95 % interval", "final accuracy (%)")


@dataclass
class CollapseCell:
    attack: str
    defense: str
    other: tuple[tuple[str, Any], ...]  # the other varying keys (not seed, attack.*, defense.*) and values
    accuracies: list[float] = field(default_factory=list)  # final accuracy of each finished run
    stopped: int = 0  # runs stopped by a lost honest majority: collapsed, no final accuracy
    missing: int = 0  # unfinished, or failed for another reason: not counted

    @property
    def counted(self) -> int:
        return len(self.accuracies) + self.stopped

    @property
    def collapsed(self) -> int:
        return sum(1 for a in self.accuracies if a < COLLAPSE_BELOW) + self.stopped


def wilson_interval(k: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (n >= 1)."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def majority_lost(run) -> bool:
    """Did the run stop because the honest majority was lost (its events.jsonl says so)?"""
    path = run.path / "events.jsonl"
    if run.finished or not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("type") == "majority_lost":
                return True
        except (ValueError, AttributeError):
            continue  # a cut last line, or not an object
    return False


def _other(run) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, v)
        for k, v in sorted(run.params.items())
        if k != "seed" and not k.startswith(("attack.", "defense."))
    )


def collapse_cells(runs) -> list[CollapseCell]:
    """One cell per (attack label, defense label, other varying keys), in the report's order."""
    cells: dict[tuple, CollapseCell] = {}
    for r in runs:
        key = (r.attack, r.defense, _other(r))
        cell = cells.setdefault(key, CollapseCell(*key))
        if r.finished and r.final_accuracy is not None:
            cell.accuracies.append(float(r.final_accuracy))
        elif majority_lost(r):
            cell.stopped += 1
        else:
            cell.missing += 1
    return [cells[k] for k in sorted(cells, key=_cell_order)]


def _natural(text: str) -> list:
    return [
        (0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
        for t in re.split(r"(\d+(?:\.\d+)?)", text)
    ]


def _cell_order(key: tuple) -> tuple:
    attack, defense, other = key
    return (
        not attack.startswith("none"),
        _natural(attack),
        not defense.startswith("mean"),
        _natural(defense),
        [(v is not None, _natural(_fmt(v))) for _, v in other],  # null (off) first
    )


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "+".join(_fmt(v) for v in value) if value else "[]"
    return str(value)


def _rate_text(cell: CollapseCell) -> str:
    if not cell.counted:
        return "—"
    return f"{cell.collapsed}/{cell.counted} ({100 * cell.collapsed / cell.counted:.0f} %)"


def _interval_text(cell: CollapseCell) -> str:
    if not cell.counted:
        return "—"
    lo, hi = wilson_interval(cell.collapsed, cell.counted)
    return f"{100 * lo:.0f}-{100 * hi:.0f} %"


def _accuracy_text(cell: CollapseCell) -> str:
    acc = [100 * a for a in cell.accuracies]
    if not acc:
        return "—"
    if len(acc) == 1:
        return f"{acc[0]:.1f}"
    return f"{statistics.fmean(acc):.1f} ± {statistics.stdev(acc):.1f}"


def _notes_text(cell: CollapseCell) -> str:
    notes = []
    if cell.stopped:
        notes.append(f"{cell.stopped} stopped (honest majority lost), counted as collapsed")
    if cell.missing:
        notes.append(f"{cell.missing} unfinished or failed, not counted")
    return "; ".join(notes)


def collapse_rows(cells: list[CollapseCell]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: attack and defense labels, the other varying keys, then the numbers (and what was not
    counted, when anything was not)."""
    keys = sorted({k for c in cells for k, _ in c.other})
    header = ["attack", "defense", *keys, *NUMBER_COLUMNS]
    with_notes = any(_notes_text(c) for c in cells)
    header += ["notes"] if with_notes else []
    rows = []
    for c in cells:
        row = [c.attack, c.defense, *(_fmt(dict(c.other).get(k)) for k in keys)]
        row += [_rate_text(c), _interval_text(c), _accuracy_text(c)]
        rows.append(row + ([_notes_text(c)] if with_notes else []))
    return header, rows


def has_cells_over_seeds(cells: list[CollapseCell]) -> bool:
    return any(c.counted + c.missing > 1 for c in cells)


def collapse_section(runs) -> list[str]:
    """report.md lines: the collapse table, or nothing when no cell has more than one run."""
    cells = collapse_cells(runs)
    if not has_cells_over_seeds(cells):
        return []
    header, rows = collapse_rows(cells)
    lines = [
        "## Collapse rate",
        "",
        f"Per config cell over its seeds: runs whose final test accuracy is below {100 * COLLAPSE_BELOW:g} %, or "
        "that stopped because the honest majority was lost, out of the runs counted (k/n), with a 95 % Wilson "
        "score interval; final accuracy mean ± sample std over the finished runs "
        "(src/byztrain/experiments/collapse.py).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "".join("---:|" if h in NUMBER_COLUMNS else "---|" for h in header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def terminal_lines(runs) -> list[str]:
    """The same table for the terminal, after a blank line; nothing when no cell has more than one run."""
    cells = collapse_cells(runs)
    if not has_cells_over_seeds(cells):
        return []
    header, rows = collapse_rows(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    table = [
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)
    ]
    return ["", "collapse rate per cell over seeds:", *table]
