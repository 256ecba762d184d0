"""Collapse rate per config cell over seeds (experiments/collapse.py), on fake run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from byztrain import cli
from byztrain.config import Config
from byztrain.experiments import collapse
from byztrain.experiments import report as rep

# (tau, clip_norm) -> final test accuracy per seed; "stopped": the honest majority was lost, "failed": another
# error, None: killed before the end. 0.5 itself is not a collapse (the rule is accuracy < 0.5).
CELLS = {
    (1.0, None): [0.8, 0.82, 0.3, 0.79],
    (3.0, None): [0.1, 0.1, 0.6, "stopped"],
    (1.0, 2.0): [0.85, 0.85, 0.49, None],
    (3.0, 2.0): [0.9, 0.5, 0.88, "failed"],
}


def fake_run(root: Path, tau: float, clip: float | None, seed: int, outcome) -> None:
    cfg = Config.from_dict(
        {
            "seed": seed,
            "peers": 16,
            "byzantine": 7,
            "attack": {"name": "sign_flip", "start": 20},
            "defense": {"name": "btard", "tau": tau},
            "train": {"steps": 300, "eval_every": 150, "clip_norm": clip},
        },
        validate=False,
    )
    d = root / f"defense.tau={tau:g},seed={seed},train.clip_norm={clip}"
    d.mkdir(parents=True)
    cfg.save(d / "config.yaml")
    last = outcome if isinstance(outcome, float) else 0.2
    steps = [0, 150, 300] if isinstance(outcome, float) else [0, 150]
    recs = [{"step": s, "test_accuracy": 0.1 if s == 0 else last, "active_peers": 16} for s in steps]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if isinstance(outcome, float):
        summary = {"final_test_accuracy": outcome, "best_test_accuracy": outcome, "steps": 300, "banned": {}}
        (d / "summary.json").write_text(json.dumps(summary))
    elif outcome == "stopped":
        (d / "events.jsonl").write_text(
            json.dumps({"step": 150, "type": "majority_lost", "reason": "x"}) + "\n"
        )
        (d / "error.txt").write_text(
            "byztrain.runtime.majority.HonestMajorityLost: the run stopped at step 150\n"
        )
    elif outcome == "failed":
        (d / "events.jsonl").write_text(json.dumps({"step": 150, "type": "ban", "peer": 3}) + "\n")
        (d / "error.txt").write_text("RuntimeError: boom\n")


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "runs"
    for (tau, clip), outcomes in CELLS.items():
        for seed, outcome in enumerate(outcomes):
            fake_run(root, tau, clip, seed, outcome)
    return root


def expected(outcomes) -> tuple[int, int, list[float]]:
    """(collapsed, counted, finished accuracies) by the rule, from the outcomes the fixture wrote."""
    acc = [o for o in outcomes if isinstance(o, float)]
    stopped = outcomes.count("stopped")
    return sum(a < collapse.COLLAPSE_BELOW for a in acc) + stopped, len(acc) + stopped, acc


def test_cells_count_collapses_stops_and_leave_out_unfinished_runs(sweep_dir):
    cells = collapse.collapse_cells(rep.load_runs(sweep_dir))
    assert len(cells) == len(CELLS)
    for cell in cells:
        other = dict(cell.other)
        tau = float(cell.defense.split("tau=")[1].rstrip(")"))
        outcomes = CELLS[(tau, other["train.clip_norm"])]
        k, n, acc = expected(outcomes)
        assert (cell.collapsed, cell.counted) == (k, n)
        assert sorted(cell.accuracies) == sorted(acc)
        assert cell.missing == sum(o is None or o == "failed" for o in outcomes)
        assert cell.attack == "sign_flip" and set(other) == {
            "train.clip_norm"
        }  # seed is pooled, not a column


def test_report_md_and_terminal_show_rate_count_interval_and_accuracy(sweep_dir, capsys):
    rep.make_sweep_report(sweep_dir)
    md = (sweep_dir / "report.md").read_text()
    assert "## Collapse rate" in md
    k, n, acc = expected(CELLS[(3.0, None)])
    lo, hi = collapse.wilson_interval(k, n)
    mean = sum(acc) / len(acc) * 100
    std = (sum((100 * a - mean) ** 2 for a in acc) / (len(acc) - 1)) ** 0.5
    row = (
        f"| sign_flip | btard (tau=3) | null | {k}/{n} ({100 * k / n:.0f} %) | {100 * lo:.0f}-{100 * hi:.0f} % "
        f"| {mean:.1f} ± {std:.1f} | 1 stopped (honest majority lost), counted as collapsed |"
    )
    assert row in md.splitlines()
    assert "| attack | defense | train.clip_norm | collapsed (accuracy < 50 %) |" in md
    assert "1 unfinished or failed, not counted" in md  # the killed run and the failed one, each in its cell
    assert cli.main(["report", str(sweep_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("collapse rate per cell over seeds:")
    assert out[i + 1].split()[:3] == ["attack", "defense", "train.clip_norm"]
    assert len([line for line in out[i + 2 :] if line.startswith("sign_flip")]) == len(CELLS)


def test_one_seed_per_cell_adds_no_section(tmp_path):
    root = tmp_path / "runs"
    for tau in (1.0, 3.0):
        fake_run(root, tau, None, 0, 0.3)
    runs = rep.load_runs(root)
    assert collapse.collapse_section(runs) == [] and collapse.terminal_lines(runs) == []
    rep.make_sweep_report(root)
    assert "Collapse rate" not in (root / "report.md").read_text()


def test_wilson_interval():
    z = collapse.WILSON_Z
    lo, hi = collapse.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z * z / (10 + z * z))  # the closed form at k = 0
    lo2, hi2 = collapse.wilson_interval(10, 10)
    assert (lo2, hi2) == pytest.approx((1 - hi, 1.0))  # symmetric in k <-> n - k
    for k in range(11):
        lo, hi = collapse.wilson_interval(k, 10)
        assert 0 <= lo < k / 10 < hi <= 1 or k in (0, 10)
    assert collapse.wilson_interval(3, 10)[1] - collapse.wilson_interval(3, 10)[0] > (
        collapse.wilson_interval(30, 100)[1] - collapse.wilson_interval(30, 100)[0]
    )
