"""Detection time against its model: the Monte Carlo of the validator draw against an exact recursion and
against real BTARD runs, the survival estimates, and the report's detection section."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from byztrain.config import Config
from byztrain.experiments import detection as det
from byztrain.runtime.keyfile import key_path
from byztrain.runtime.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_monte_carlo_matches_the_exact_recursion_for_one_attacker_and_one_validator():
    n, start, horizon = 8, 5, 60
    pred = det.predict(det.Cell(n, 1, 1, start), start + horizon, runs=4000)
    surv = det.kaplan_meier(*pred.delays(), horizon)
    exact = det.exact_survival_one_attacker(n, start, horizon)
    assert exact[0] == 1.0 and np.all(np.diff(exact) <= 0)
    assert np.abs(surv - exact).max() < 0.03  # KS 1 % critical value at 4000 draws: 0.026
    # the recursion itself: one step after the start, a worker (prob. 1 - 1/n) is caught w.p. 1/(n-1)
    assert exact[1] == pytest.approx(1 - (1 - 1 / n) / (n - 1))


def test_simulated_bans_follow_the_attack_window_and_count_attack_steps():
    cell = det.Cell(16, 2, 6, start=20, every=10)
    rng = random.Random(0)
    fates = [f for _ in range(200) for f in det.simulate_run(cell, 200, rng)]
    banned = [f for f in fates if f.ban_step is not None]
    assert banned and len(banned) < len(fates)
    # a ban audits the step before: only right after an attack step
    assert {(f.ban_step - 1 - 20) % 10 for f in banned} == {0}
    for f in fates:
        end = f.ban_step if f.ban_step is not None else 200
        assert f.attempts == len(range(20, end + 1, 10)) and 0 <= f.poisoned <= f.attempts
    always = [f for _ in range(100) for f in det.simulate_run(det.Cell(16, 1, 7, 20), 120, rng)]
    assert all(f.ban_step is None or f.attempts == f.ban_step - 20 + 1 for f in always)


def test_byzantine_peers_cover_each_other_outside_the_attack_window_too(synthetic, tmp_path):
    # Collusion is not an attack step: off the window a Byzantine peer sends honest gradients but still never
    # reports a fellow attacker (the adversary the paper's detection rate assumes), and the model agrees.
    cfg = Config.from_dict({
        "peers": 8, "byzantine": 3, "attack": {"name": "sign_flip", "start": 2, "every": 2},
        "defense": {"name": "btard"}, "train": {"steps": 4, "batch_size": 4},
        "log": {"tensorboard": False, "out": str(tmp_path)},
    })
    tr = Trainer(cfg, writer=None, progress=False)
    off = tr.make_round(3)  # steps 2, 4 attack; step 3 does not
    assert not off.attack_on
    attacker, fellow = sorted(off.byzantine)[:2]
    honest = next(p for p in off.active if p not in off.byzantine)
    assert off.tamper(attacker, "on_report", True, fellow, "mismatch") is False
    assert off.tamper(attacker, "on_report", True, honest, "mismatch") is True
    g = torch.ones(3)
    assert off.tamper(attacker, "on_gradient", g, g) is g  # everything else stays honest off the window

    def share_banned(every: int) -> float:  # n = 5, b = 2, m = 2: Byzantine validators often draw their fellow
        rng, cell = random.Random(1), det.Cell(5, 2, 2, 2, every)  # a lie at step 2, its audit at step 3
        return float(np.mean([f.ban_step is not None for _ in range(3000) for f in det.simulate_run(cell, 3, rng)]))

    assert share_banned(2) == pytest.approx(share_banned(1), abs=0.03)  # step 3 off the window or not


def test_kaplan_meier_with_censoring_and_its_summaries():
    time = np.array([1, 2, 2, 3])
    banned = np.array([True, False, True, True])
    surv = det.kaplan_meier(time, banned, 4)
    assert surv.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    assert det.restricted_mean(surv) == pytest.approx(1 + 0.75 + 0.5 + 0.0)
    assert det.median_time(surv) == 2 and det.median_time(np.array([1.0, 0.9])) is None


def test_is_detection_grid_needs_every_run_btard_under_a_modelled_attack():
    def run(defense="btard", attack="sign_flip", b=3):
        return SimpleNamespace(flat={"defense.name": defense, "attack.name": attack, "byzantine": b})

    assert det.is_detection_grid([run(), run()])
    assert not det.is_detection_grid([run(), run(defense="mean")])
    assert not det.is_detection_grid([run(attack="alie")]) and not det.is_detection_grid([run(b=0)])
    assert not det.is_detection_grid([])


def test_real_runs_agree_with_the_model_and_the_report_shows_it(tmp_path):
    """Four real runs (n = 8, b = 3, m = 1, sign flip from step 3, 11 steps, fixed MPRNG keys): every ban is a
    validator's recomputation of a Byzantine peer, and the attackers banned, and their capped ban times, lie
    inside the model's 0.1-99.9 % range for four runs; then `byztrain report` adds the detection section."""
    from byztrain import run
    from byztrain.experiments import make_report

    start, steps, seeds = 3, 11, 4
    cfg = {"peers": 8, "byzantine": 3, "attack": {"name": "sign_flip", "start": start},
           "defense": {"name": "btard", "validators": 1},
           "train": {"steps": steps, "eval_every": steps, "batch_size": 4},
           "log": {"every": 1, "tensorboard": False}}
    fates = []
    for seed in range(seeds):
        out = tmp_path / f"seed={seed}"
        out.mkdir()
        key_path(out).write_text(bytes([seed + 1] * 32).hex() + "\n")  # the runs replay exactly
        summary = run({**cfg, "seed": seed, "log": {**cfg["log"], "out": str(out)}}, quiet=True)
        byz = summary["byzantine_peers"]
        assert summary["honest_banned"] == 0
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        for e in (e for e in events if e["type"] == "ban"):
            assert e["peer"] in byz and e["step"] > start and "gradient differs from the recomputation" in e["reason"]
        bans = {int(p): s for p, s in summary["banned"].items()}
        fates += [det.AttackerFate(bans.get(a), 0, 0) for a in byz]
    h = steps - start
    time, banned = det._delays(fates, start, steps)
    stats = (banned.sum(), np.minimum(time, h).sum())
    sims = det.predict(det.Cell(8, 1, 3, start), steps, runs=4000)
    t_mc, b_mc = sims.delays()
    per_run = [(b_mc[i : i + 3].sum(), np.minimum(t_mc[i : i + 3], h).sum()) for i in range(0, len(b_mc), 3)]
    groups = np.array(per_run).reshape(-1, seeds, 2).sum(axis=1)  # 1000 groups of four runs
    lo, hi = np.percentile(groups, [0.1, 99.9], axis=0)
    assert np.all(lo <= stats) and np.all(stats <= hi), (stats, lo, hi)

    make_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Detection time against the validator model" in md and "| n=8, m=1, b=3 | 4 | 12 |" in md
    assert (tmp_path / "detection.png").exists()


def test_the_detection_grid_has_the_largest_b_btard_accepts_in_all_nine_cells(tmp_path):
    from pathlib import Path

    from byztrain.config import Config, ConfigError
    from byztrain.experiments.sweep import plan

    root = Path(__file__).resolve().parents[1] / "experiments"
    _, points, _ = plan(root / "detection.yaml", out=tmp_path)
    cells = {(p.config.defense.validators, p.config.peers, p.config.byzantine) for p in points}
    assert {(m, n) for m, n, _ in cells} == {(m, n) for m in (1, 2, 4) for n in (16, 32, 64)}
    assert len(points) == 9 * 10 and all(p.config.train.steps <= 300 for p in points)
    for p in points:
        assert p.config.attack.name == "sign_flip" and p.config.attack.start == 20 and p.config.attack.every == 1
        data = p.config.to_dict()
        data["byzantine"] += 1
        with pytest.raises(ConfigError, match="byzantine"):
            Config.from_dict(data)
    _, points, _ = plan(root / "detection-intermittent.yaml", out=tmp_path)
    assert {p.config.attack.every for p in points} == {10, 100} and len(points) == 20
