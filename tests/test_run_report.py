"""`byztrain report RUN_FOLDER`: one run's labelled curves and ban timeline (report.md + PNGs)."""

from __future__ import annotations

import json

from byztrain import cli
from byztrain.experiments import run_report as rr
from test_experiments import fake_run

STEP = "training step (optimizer steps)"


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_report_on_a_run_folder_gives_its_curves_bans_and_facts(tmp_path, capsys):
    run_dir = fake_run(tmp_path, attack="sign_flip", defense="btard", seed=0, cclip=True, ban_steps=[4, 4, 6],
                       honest_ban=True)
    assert cli.main(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    names = {"accuracy.png", "loss.png", "peers.png", "cclip.png", "bans.png"}
    for name in names:
        assert (run_dir / name).stat().st_size > 10_000 and str(run_dir / name) in printed
    md = (run_dir / "report.md").read_text()
    assert "| attack | sign_flip from step 4 |" in md
    assert "| attackers banned | 3 of 3, the last at step 6 |" in md
    assert "| honest peers banned | 1 |" in md
    assert md.count("| Byzantine |") == 3 and md.count("| **honest** |") == 1
    for name in names:
        assert f"]({name})" in md
    assert not (tmp_path / "report.md").exists()  # the run folder's report, not a sweep report of its parent


def test_run_figures_are_labelled(tmp_path):
    run = rr.load_single_run(fake_run(tmp_path, attack="sign_flip", defense="btard", seed=0, cclip=True,
                                      ban_steps=[4, 6]))
    figs = rr.run_figures(run)
    assert list(figs) == ["accuracy", "loss", "peers", "cclip", "bans"]
    ylabels = {name: fig.axes[0].get_ylabel() for name, fig in figs.items()}
    assert ylabels == {
        "accuracy": "test accuracy (%)",
        "loss": "training loss (cross-entropy)",
        "peers": "active peers (count)",
        "cclip": "iterations (count)",
        "bans": "peer",
    }
    for fig in figs.values():
        (ax,) = fig.axes
        assert ax.get_xlabel() == STEP and "btard, sign_flip, 3 of 8 Byzantine" in ax.get_title()
        assert "attack starts (step 4)" in _legend(ax)
    # Active peers drop exactly at the ban steps, to peers minus the two banned.
    line = figs["peers"].axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0, 4, 6, 10] and list(line.get_ydata()) == [8, 7, 6, 6]
    assert "honest peers (5)" in _legend(figs["peers"].axes[0])
    bans = figs["bans"].axes[0]
    assert "2 of 3 Byzantine peers banned, 0 honest" in bans.get_title()
    assert _legend(bans)[:3] == ["honest peer, taking part", "Byzantine peer, taking part", "Byzantine peer banned"]
    assert sum(len(ln.get_xdata()) for ln in bans.get_lines() if ln.get_marker() == "X") == 2
    assert _legend(figs["cclip"].axes[0])[0].startswith("cclip_iters")


def test_ban_reasons_come_from_events_and_a_defense_without_cclip_has_no_cclip_figure(tmp_path):
    run_dir = fake_run(tmp_path, attack="sign_flip", defense="mean", seed=0, ban_steps=[6])
    peer = json.loads((run_dir / "summary.json").read_text())["byzantine_peers"][0]
    event = {"step": 6, "type": "ban", "peer": peer, "by": 2, "reason": "accused by 2: bad gradient"}
    (run_dir / "events.jsonl").write_text(json.dumps({"step": 5, "type": "accuse"}) + "\n" + json.dumps(event))
    outputs = rr.make_run_report(run_dir, tmp_path / "out")
    assert {p.name for p in outputs.figures} == {"accuracy.png", "loss.png", "peers.png", "bans.png"}
    md = outputs.report_md.read_text()
    assert f"| 6 | {peer} | Byzantine | 2 | accused by 2: bad gradient |" in md
    assert "| attackers banned | 1 of 3, the last at step 6 |" in md
