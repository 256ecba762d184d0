"""A trusted-server baseline facing malformed messages: the sender is banned, the run goes on without it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from byztrain import Config
from byztrain.api import run
from byztrain.attacks.gradient import SignFlip
from byztrain.defenses import AggregatorDefense
from byztrain.runtime.round import Round

NAN = lambda self, g, ctx: torch.full_like(g, math.nan)  # noqa: E731
PARTLY_NAN = lambda self, g, ctx: torch.where(torch.arange(g.numel()) % 7 == 0, math.nan, g)  # noqa: E731
WRONG_SHAPE = lambda self, g, ctx: g[:-1].clone()  # noqa: E731  (a hook result breaking its contract)


def _config(tmp_path, defense: dict) -> Config:
    return Config.from_dict({
        "peers": 7, "byzantine": 2, "attack": {"name": "sign_flip", "start": 3}, "defense": defense,
        "train": {"steps": 6, "batch_size": 8, "eval_every": 6},
        "log": {"tensorboard": False, "out": str(tmp_path), "every": 1},
    })


@pytest.mark.parametrize("send", [NAN, PARTLY_NAN, WRONG_SHAPE], ids=["nan", "partly-nan", "wrong-shape"])
@pytest.mark.parametrize("defense", [
    {"name": "mean"}, {"name": "median"}, {"name": "krum"}, {"name": "cclip_ps", "params": {"momentum": True}},
    {"name": "trimmed_mean", "pre": ["nnm"]},
], ids=lambda d: d["name"])
def test_a_malformed_message_bans_its_sender_and_the_server_aggregates_the_rest(
    synthetic, tmp_path, monkeypatch, send, defense
):
    # Before the server checked its input, the robust rules raised on the NaN rows (the run crashed) and
    # plain averaging skipped every attacked step without banning anyone.
    monkeypatch.setattr(SignFlip, "on_gradient", send)
    summary = run(_config(tmp_path, defense), quiet=True)
    assert summary["steps"] == 6 and math.isfinite(summary["final_test_accuracy"])
    assert {int(p): s for p, s in summary["banned"].items()} == {p: 3 for p in summary["byzantine_peers"]}
    assert summary["honest_banned"] == 0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert all(e["reason"].startswith("malformed") for e in events if e["type"] == "ban")
    assert not any(e["type"] == "update_skipped" for e in events)


def test_the_rule_is_rebound_with_f_less_the_convicted(synthetic, tmp_path):
    # krum needs n >= 2f + 3: 7 rows with f = 2 pass, 5 rows pass once the 2 missing are convicted (f = 0),
    # 5 rows with nobody convicted (two honest crashes, say) cannot keep f = 2, and the run must stop.
    defense = AggregatorDefense(_config(tmp_path, {"name": "krum"}))
    assert defense._pipeline(5, convicted=2)[1].n == 5
    with pytest.raises(RuntimeError, match="'krum' cannot aggregate the 5 peers left with f=2"):
        defense._pipeline(5, convicted=0)


def test_rows_with_opposite_infinities_are_not_mistaken_for_nan():
    # The NaN screen looks at row sums first; +inf and -inf in one row sum to NaN without being NaN.
    banned = {}
    fake = SimpleNamespace(ban=lambda peer, reason: banned.setdefault(peer, reason))
    rows = torch.tensor([[1.0, 2.0], [math.inf, -math.inf], [math.nan, 0.0], [0.0, math.inf]])
    senders, kept = Round._without_nan(fake, [4, 5, 6, 7], rows)
    assert senders == [4, 5, 7] and banned == {6: "malformed gradient: NaN"}
    assert torch.equal(kept, rows[[0, 1, 3]])
