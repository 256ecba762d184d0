"""`byztrain sweep` and `byztrain report`, registered into byztrain.cli."""

from __future__ import annotations

import argparse
import signal
import sys

from byztrain.config import split_config_and_overrides
from byztrain.experiments.run_report import make_report
from byztrain.experiments.sweep import sweep

SWEEP_EPILOG = """\
grid format: any list-valued key expands (product); a list of mappings at a section gives variants
(defense: [{name: mean}, {name: btard, tau: [1, 10]}]); a list-typed key (defense.pre) expands only
from a list of lists. See docs/experiments.md.

examples:
  byztrain sweep experiments/demo.yaml --jobs 2         # runs/demo/<run folders>
  byztrain sweep experiments/seed-grid.yaml --shard 1/2  # this machine: every 2nd run, starting at the 1st
  byztrain sweep grid.yaml seed=[0,1,2] train.steps=200  # overrides; a list here expands too
  byztrain sweep grid.yaml --dry-run                     # list the runs and what would be skipped
"""

REPORT_EPILOG = """\
a sweep folder: results.csv, report.md, accuracy-*.png, bans*.png, cclip*.png, heatmap*.png (grids varying
  byzantine and task.alpha or task.gamma), and a table on the terminal (with the defenses ranked by their
  worst case over the attacks when there are several)
one run folder: report.md, results.csv, accuracy.png, loss.png, peers.png, cclip.png (BTARD, cclip_ps), bans.png

examples:
  byztrain report runs/demo
  byztrain report runs/quickstart
"""


def cmd_sweep(args: argparse.Namespace) -> int:
    grid_path, overrides = split_config_and_overrides(args.items)
    if grid_path is None:
        raise SystemExit("error: byztrain sweep needs a grid file (e.g. experiments/demo.yaml)")
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")

    def _terminate(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)  # a kill stops the workers too; rerun resumes
    try:
        result = sweep(
            grid_path,
            overrides,
            out=args.out,
            jobs=args.jobs,
            shard=args.shard,
            dry_run=args.dry_run,
            progress=not args.no_progress and not args.dry_run,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.dry_run:
        return 0
    print(
        f"sweep: {len(result.ran)} ran, {len(result.skipped)} skipped (already finished), "
        f"{len(result.failed)} failed; outputs in {result.out}"
    )
    if result.failed:
        for point, error in result.failed:
            print(f"  failed: {point.name}: {error}", file=sys.stderr)
        print(
            f"sweep: {len(result.failed)} runs failed; rerun the same command to retry them", file=sys.stderr
        )
        return 1
    print(f"next: byztrain report {result.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    outputs = make_report(args.dir, out=args.out)
    print("\n".join(outputs.table))
    print()
    print(
        f"{outputs.runs} run{'' if outputs.runs == 1 else 's'} ({outputs.finished} finished, {outputs.unfinished} unfinished, "
        f"{outputs.failed} failed); the report, its figures and a row per run:"
    )
    print(f"  {outputs.report_md}")
    for path in outputs.figures:
        print(f"  {path}")
    print(f"  {outputs.results_csv}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of configs (resumable, parallel, shardable)",
        description="Run every point of a grid file in a process pool. Finished runs (summary.json with the "
        "same config hash) are skipped, so rerunning after a kill resumes.",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("items", nargs="+", metavar="GRID.yaml [key=value ...]")
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel runs (default: number of cores)")
    p.add_argument("--shard", metavar="i/k", help="run only every k-th grid point, starting at the i-th")
    p.add_argument("--out", help="sweep folder (default runs/<grid file name>, or log.out of the grid)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; start nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    r = sub.add_parser(
        "report",
        help="tables and figures from the runs below a folder",
        description="Read every run folder below DIR (finished or not) and write results.csv, report.md and "
        "PNG figures.",
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--out", help="where to write the report (default DIR)")
    r.set_defaults(func=cmd_report)
