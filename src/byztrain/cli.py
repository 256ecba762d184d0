"""Command line: thin parsing around byztrain's Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from byztrain import bench
from byztrain.api import run
from byztrain.config import Config, ConfigError, split_config_and_overrides
from byztrain.experiments import cli as experiments_cli
from byztrain.listing import render
from byztrain.registry import KINDS
from byztrain.runtime.majority import HonestMajorityLost
from byztrain.runtime.progress import format_duration

EXAMPLES = """\
examples:
  byztrain run                                   # 16 peers, Fashion-MNIST, mean aggregation, defaults
  byztrain run experiments/quickstart.yaml       # a config file
  byztrain run defense.name=btard byzantine=7 attack.name=sign_flip attack.start=200
  byztrain run cfg.yaml train.lr=0.05 peers=32 --out runs/lr05
  byztrain run cfg.yaml runtime.kind=distributed # one process per peer (docs/distributed.md)
  byztrain run --resume --out runs/lr05          # continue from the run folder's last checkpoint
  byztrain sweep experiments/demo.yaml --jobs 2  # a grid: every list-valued key expands
  byztrain report runs/demo                      # a sweep: outcome table, report.md, figures, results.csv
  byztrain report runs/quickstart                # one run: its curves and ban timeline
  byztrain list aggregators                      # every rule with its parameters and reference
  byztrain bench --json                          # performance ratios

Any config key can be set as key=value (dotted for sections); see docs/config.md.
"""


def _load_config(items: list[str], out: str | None, resume: bool = False):
    path, overrides = split_config_and_overrides(items)
    if out:
        overrides.append(f"log.out={out}")
    if path is None:
        config = Config.from_dict({}).with_overrides(overrides)
        saved = Path(config.out_dir) / "config.yaml"
        if resume and saved.exists():
            # `byztrain run --resume --out DIR [key=value ...]`: the run's own config, overrides on top
            return Config.load(saved, overrides)
        return config
    return Config.load(path, overrides)


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    print("\n\n".join(render(k) for k in kinds))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args.items, args.out, args.resume)
    summary = run(config, quiet=args.quiet, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun: rank 0 reports for the run
    if not args.quiet:
        print(outcome(config, summary))
    else:
        print(json.dumps(summary))
    return 0


def outcome(config, summary: dict) -> str:
    """What happened in a finished run, for the end of `byztrain run`: accuracy, bans, where the files are."""
    acc, best = summary.get("final_test_accuracy"), summary.get("best_test_accuracy")
    rows = [("final test accuracy", "n/a" if acc is None else f"{100 * acc:.1f}% (best {100 * best:.1f}%)")]
    byzantine = [int(p) for p in summary.get("byzantine_peers", [])]
    bans = {int(p): int(s) for p, s in summary.get("banned", {}).items()}
    caught = sorted(s for p, s in bans.items() if p in byzantine)
    if byzantine:
        text = f"{len(caught)} of {len(byzantine)}"
        if caught:
            text += f", the last at step {caught[-1]}"
        if config.attack.name != "none":
            text += f" (attack {config.attack.name} from step {config.attack.start})"
        rows.append(("attackers banned", text))
    else:
        rows.append(("attackers", "none in this run (byzantine: 0)"))
    honest = sorted(p for p in bans if p not in byzantine)
    text = "0" if not honest else f"{len(honest)}: peers {', '.join(map(str, honest))} (false positives)"
    rows.append(("honest peers banned", text))
    rows.append(("run folder", str(config.out_dir)))
    rows.append(("report", f"byztrain report {config.out_dir}"))
    head = f"finished {config.name}: {summary.get('steps')} steps in {format_duration(summary['wall_seconds'])}"
    return "\n".join([head, *(f"  {k:<20} {v}" for k, v in rows)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="byztrain",
        description="Simulate and run BTARD-SGD and robust aggregators under Byzantine attacks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run one training run",
        description="Run one training run. CONFIG.yaml is optional; key=value items override it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--out", help="run folder (default runs/<name>); same as log.out=DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar; print the summary as JSON")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's last checkpoint (runtime.checkpoint_every); without CONFIG.yaml "
        "the folder's config.yaml is used; a finished run just prints its summary",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "list",
        help="list the aggregators, attacks, datasets, ... with their parameters",
        description="List every registered plugin of a kind with its parameters, defaults, preconditions and "
        "reference. Without KIND: every kind.",
    )
    p.add_argument("kind", nargs="?", choices=list(KINDS), metavar="KIND", help=f"one of: {', '.join(KINDS)}")
    p.set_defaults(func=cmd_list)

    experiments_cli.register(sub)  # sweep, report
    bench.register(sub)
    return parser


#: exit code of a run stopped because its honest majority was lost (byztrain.runtime.majority)
EXIT_MAJORITY_LOST = 3


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"byztrain: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        # Missing data or config files: the message already says where we looked and what to do.
        print(f"byztrain: error: {exc}", file=sys.stderr)
        return 2
    except HonestMajorityLost as exc:  # an expected stop: the message says what broke, no traceback
        print(f"byztrain: stopped: {exc}", file=sys.stderr)
        return EXIT_MAJORITY_LOST
    except KeyboardInterrupt:
        print("byztrain: interrupted; metrics written so far are in the run folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

