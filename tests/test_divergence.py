"""Training that diverges ends the run as `diverged`: nobody is banned for it, and what ran is kept."""

from __future__ import annotations

import json

import pytest

from byztrain import Config
from byztrain.api import run


@pytest.mark.parametrize("defense", ["mean", "median", "btard"])
def test_a_diverging_run_ends_cleanly_and_bans_nobody(defense, synthetic, tmp_path):
    # lr 1e6 blows the parameters up within a few steps; the honest gradients then turn NaN or inf.
    cfg = Config.from_dict({
        "peers": 6, "byzantine": 0, "defense": {"name": defense},
        "train": {"steps": 40, "batch_size": 8, "lr": 1e6, "momentum": 0.0, "eval_every": 40},
        "log": {"tensorboard": False, "out": str(tmp_path / defense), "every": 1},
    })
    summary = run(cfg, quiet=True)
    assert summary["diverged_at"] is not None and summary["steps"] == summary["diverged_at"] - 1 < 40
    assert summary["honest_banned"] == 0 and summary["banned"] == {}
    events = [json.loads(line) for line in (tmp_path / defense / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "diverged"] == [summary["diverged_at"]]
    assert not any(e["type"] == "ban" for e in events)
    saved = json.loads((tmp_path / defense / "summary.json").read_text())
    assert saved["diverged_at"] == summary["diverged_at"]
    metrics = [json.loads(line) for line in (tmp_path / defense / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == summary["steps"] and "test_accuracy" in metrics[-1]
