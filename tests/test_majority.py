"""A run stops when its honest majority is lost (runtime/majority.py): honest peers convicted beyond the
Byzantine count, or a Byzantine share of the active peers the defense cannot tolerate. Simulated runs with a
test-only "framing" of honest peers (a defense step that bans them), the CLI and a sweep; the distributed
runtime's stop is in tests/test_distributed.py."""

from __future__ import annotations

import json

import pytest

import byztrain
from byztrain import Config
from byztrain.cli import EXIT_MAJORITY_LOST, main
from byztrain.defenses import MeanDefense
from byztrain.experiments.sweep import sweep
from byztrain.protocol.btard import BtardDefense
from byztrain.runtime import checkpoint as ckpt
from byztrain.runtime.majority import HonestMajorityLost, lost
from byztrain.runtime.trainer import choose_byzantine

pytestmark = pytest.mark.usefixtures("one_thread", "synthetic")


def _config(out, *, peers=8, byzantine=1, defense="mean", steps=20, **over) -> Config:
    data = {
        "name": "majority",
        "seed": 1,
        "peers": peers,
        "byzantine": byzantine,
        "defense": {"name": defense},
        "train": {"steps": steps, "eval_every": steps, "batch_size": 16},
        "runtime": {"checkpoint_every": 4},
        "log": {"out": str(out), "every": 3, "tensorboard": False},
    }
    data.update(over)
    return Config.from_dict(data)


def _honest(config: Config) -> list[int]:
    byz = choose_byzantine(config)
    return [p for p in range(1, config.peers) if p not in byz]


def frame(monkeypatch, defense_cls, plan):
    """Test-only: after the defense's step, ban the peers `plan(rnd)` names ((peer, reason) pairs), as a
    broken protocol would ban honest peers."""
    original = defense_cls.step

    def step(self, rnd):
        result = original(self, rnd)
        for peer, reason in plan(rnd):
            if peer in rnd.active:
                rnd.ban(peer, reason)
        return result

    monkeypatch.setattr(defense_cls, "step", step)


def at_steps(schedule: dict[int, list[tuple[int, str]]]):
    return lambda rnd: schedule.get(rnd.step, [])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the rule ------------------------------------------------------------------------------------------


def test_rule_counts_convictions_beyond_b_and_the_defense_s_majority():
    mean = Config.from_dict({"peers": 8, "byzantine": 2})
    # Byzantine bans never break it
    assert lost(mean, [3, 5], [0, 1, 2, 4, 6, 7], {3: 1, 5: 2}, ()) is None
    # one honest conviction within b: the majority holds (2 of 7)
    assert lost(mean, [3, 5], [0, 2, 3, 4, 5, 6, 7], {1: 1}, ()) is None
    # three convictions with b = 2
    got = lost(mean, [3, 5], [0, 3, 4, 5, 6], {1: 1, 2: 1, 7: 2}, ())
    assert "3 peer(s) banned but only 2 Byzantine" in got["reason"] and got["honest_convicted"] == [1, 2, 7]
    # the same bans for silence (crashed processes) are tolerated...
    assert lost(mean, [3, 5], [0, 3, 4, 5, 6], {1: 1, 2: 1, 7: 2}, {1, 2, 7}) is None
    # ...until the Byzantine peers are half of the active ones
    got = lost(mean, [3, 5], [0, 3, 5, 6], {1: 1, 2: 1, 4: 1, 7: 2}, {1, 2, 4, 7})
    assert "Byzantine share 2 of 4" in got["reason"] and got["byzantine_active"] == 2 and got["active"] == 4
    # BTARD counts its validators out: 3 Byzantine of 7 active with m = 1 is no majority (3 >= (7 - 1)/2)
    btard = Config.from_dict({"peers": 8, "byzantine": 3, "defense": {"name": "btard", "validators": 1}})
    got = lost(btard, [2, 4, 6], [0, 2, 3, 4, 5, 6, 7], {1: 1}, ())
    assert "Byzantine share 3 of 7" in got["reason"] and "(7 - 1)/2" in got["reason"] and got["validators"] == 1
    # a baseline run configured without an honest majority is an experiment, not a broken assumption
    many = Config.from_dict({"peers": 4, "byzantine": 2})
    assert lost(many, [1, 2], [0, 1, 2, 3], {}, ()) is None


# ---- simulated runs ------------------------------------------------------------------------------------


def test_convicted_honest_peers_beyond_b_stop_the_run_with_its_folder_intact(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    h1, h2 = _honest(cfg)[:2]
    frame(monkeypatch, MeanDefense, at_steps({3: [(h1, "test: framed")], 5: [(h2, "test: framed")]}))
    with pytest.raises(HonestMajorityLost, match=r"step 5: 2 peer\(s\) banned but only 1 Byzantine"):
        byztrain.run(cfg, quiet=True)
    events = _rows(tmp_path / "events.jsonl")
    stop = [e for e in events if e["type"] == "majority_lost"]
    assert len(stop) == 1 and stop[0]["step"] == 5
    assert stop[0]["honest_convicted"] == [h1, h2] and stop[0]["banned"] == 2 and stop[0]["byzantine"] == 1
    assert stop[0]["active"] == 6 and stop[0]["byzantine_active"] == 1
    metrics = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 3, 5]  # the partial window of steps 4-5 is flushed
    assert metrics[-1]["banned"] == sorted([h1, h2]) and metrics[-1]["active_peers"] == 6
    assert ckpt.latest(tmp_path)["step"] == 5  # nothing computed is lost
    assert not (tmp_path / "summary.json").exists()  # the run did not finish
    # it cannot be resumed past the stop: it stops again at once, without running a step
    with pytest.raises(HonestMajorityLost, match="2 peer"):
        byztrain.run(cfg, quiet=True, resume=True)
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 3, 5]
    assert [e["type"] for e in _rows(tmp_path / "events.jsonl")][-1] == "resume"


def test_btard_stops_when_honest_bans_leave_the_byzantine_peers_half_of_the_workers(tmp_path, monkeypatch):
    """8 peers, 3 Byzantine, one validator: one honest peer banned (as silent, i.e. a crash, which alone
    would be tolerated) leaves 3 Byzantine among 7 active, 6 aggregating: no honest majority."""
    cfg = _config(tmp_path, byzantine=3, defense="btard")
    (h,) = _honest(cfg)[:1]
    frame(monkeypatch, BtardDefense, at_steps({2: [(h, "silent: test crash")]}))
    with pytest.raises(HonestMajorityLost, match=r"Byzantine share 3 of 7 active peers: btard needs"):
        byztrain.run(cfg, quiet=True)
    (stop,) = [e for e in _rows(tmp_path / "events.jsonl") if e["type"] == "majority_lost"]
    assert stop["step"] == 2 and stop["honest_silent"] == [h] and stop["honest_convicted"] == []
    assert stop["validators"] == 1


def test_crashed_honest_peers_beyond_b_do_not_stop_a_run_that_keeps_its_majority(tmp_path, monkeypatch):
    cfg = _config(tmp_path, steps=6)
    h1, h2 = _honest(cfg)[:2]
    frame(monkeypatch, MeanDefense, at_steps({2: [(h1, "silent: test crash")], 3: [(h2, "silent: test")]}))
    summary = byztrain.run(cfg, quiet=True)
    assert summary["steps"] == 6 and summary["honest_banned"] == 2
    assert all(e["type"] != "majority_lost" for e in _rows(tmp_path / "events.jsonl"))


# ---- CLI and sweeps ------------------------------------------------------------------------------------


def test_cli_prints_the_reason_without_a_traceback_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path)
    h1, h2 = _honest(cfg)[:2]
    frame(monkeypatch, MeanDefense, at_steps({2: [(h1, "test: framed"), (h2, "test: framed")]}))
    code = main(["run", "peers=8", "byzantine=1", "seed=1", "train.steps=5", "train.batch_size=16",
                 "log.tensorboard=false", f"--out={tmp_path}", "--quiet"])
    assert code == EXIT_MAJORITY_LOST != 0
    err = capsys.readouterr().err
    assert err.startswith("byztrain: stopped: the run stopped at step 2: 2 peer(s) banned but only 1 Byzantine")
    assert "Traceback" not in err


def test_sweep_records_the_stopped_run_as_failed_and_runs_the_others(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    h1, h2 = _honest(cfg)[:2]
    bad = [(h1, "test: framed"), (h2, "test: framed")]
    frame(monkeypatch, MeanDefense, lambda rnd: bad if rnd.config.train.lr == 0.123 else [])
    grid = {"seed": 1, "peers": 8, "byzantine": 1, "train": {"steps": 4, "batch_size": 16, "lr": [0.05, 0.123]},
            "log": {"tensorboard": False}}
    result = sweep(grid, out=tmp_path / "sweep", progress=False, echo=None, isolate=False)
    assert [p.name for p in result.ran] == ["train.lr=0.05"]
    ((point, error),) = result.failed
    assert point.name == "train.lr=0.123"
    assert error.startswith("HonestMajorityLost: the run stopped at step 1: 2 peer(s) banned but only 1")
    assert (tmp_path / "sweep" / "train.lr=0.123" / "error.txt").exists()
