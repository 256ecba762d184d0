"""ByzFL's heterogeneity splits: extreme (sorted by label) and gamma_similarity."""

from __future__ import annotations

import pytest
import torch

import byztrain
from byztrain import Config
from byztrain.config import ConfigError
from byztrain.tasks import partition

LABELS = torch.arange(10).repeat_interleave(60)[torch.randperm(600, generator=torch.Generator().manual_seed(0))]


def _labels_of(shard):
    return set(LABELS[shard].tolist())


@pytest.mark.parametrize("split, gamma", [("extreme", 0.5), ("gamma_similarity", 0.0), ("gamma_similarity", 0.3),
                                          ("gamma_similarity", 1.0)])
def test_shards_are_disjoint_and_cover_everything(split, gamma):
    shards = partition(LABELS, 10, split, 0.5, 3, gamma=gamma)
    joined = torch.cat(shards)
    assert len(shards) == 10 and sorted(joined.tolist()) == list(range(600))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 2


def test_extreme_gives_each_peer_one_label_and_ignores_the_seed():
    shards = partition(LABELS, 10, "extreme", 0.5, 0)
    assert [_labels_of(s) for s in shards] == [{c} for c in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(shards, partition(LABELS, 10, "extreme", 0.5, 99), strict=True))


def test_gamma_zero_is_extreme_and_gamma_moves_towards_iid():
    extreme = partition(LABELS, 10, "extreme", 0.5, 0)
    zero = partition(LABELS, 10, "gamma_similarity", 0.5, 4, gamma=0.0)
    assert all(torch.equal(a, b) for a, b in zip(extreme, zero, strict=True))
    labels_per_peer = {g: min(len(_labels_of(s)) for s in partition(LABELS, 10, "gamma_similarity", 0.5, 4, gamma=g))
                       for g in (0.2, 1.0)}
    assert labels_per_peer[0.2] >= 3 and labels_per_peer[1.0] == 10


def test_gamma_similarity_is_a_function_of_the_seed():
    a = partition(LABELS, 7, "gamma_similarity", 0.5, 5, gamma=0.4)
    b = partition(LABELS, 7, "gamma_similarity", 0.5, 5, gamma=0.4)
    c = partition(LABELS, 7, "gamma_similarity", 0.5, 6, gamma=0.4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_bad_gamma_is_refused():
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        partition(LABELS, 4, "gamma_similarity", 0.5, 0, gamma=1.5)
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"task": {"split": "gamma_similarity", "gamma": -0.1}})
    assert err.value.field == "task.gamma"
    with pytest.raises(ConfigError, match="gamma_similarity, extreme") as err:
        Config.from_dict({"task": {"split": "extremes"}})
    assert err.value.field == "task.split"


@pytest.mark.parametrize("split", ["gamma_similarity", "extreme"])
def test_btard_validators_recompute_exactly_under_the_new_splits(synthetic, one_thread, tmp_path, split):
    """Validators recompute peers' gradients from the shards: an honest run bans nobody."""
    cfg = Config.from_dict({
        "name": "t", "peers": 5, "task": {"split": split, "gamma": 0.3},
        "defense": {"name": "btard", "validators": 1},
        "train": {"steps": 4, "eval_every": 4, "batch_size": 8},
        "log": {"out": str(tmp_path), "every": 2, "tensorboard": False},
    })
    summary = byztrain.run(cfg, quiet=True)
    assert summary["steps"] == 4 and not summary["banned"] and summary["honest_banned"] == 0
