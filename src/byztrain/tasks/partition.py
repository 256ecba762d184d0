"""Split a training set into disjoint per-peer shards: iid, label-skewed with a Dirichlet prior, ByzFL's
gamma-similarity, or extreme (sorted by label).

Every split is a deterministic function of ``(labels, peers, split, alpha, gamma, seed)``: all randomness comes
from ``numpy.random.default_rng(seed)``. Shards are returned sorted (a shard is a set; each peer's sampler,
driven by its public seed, decides the order).
"""

from __future__ import annotations

import numpy as np
import torch

from byztrain.registry import SPLITS, Entry

__all__ = ["default_min_size", "partition"]


def default_min_size(num_samples: int, peers: int) -> int:
    """The least number of samples a Dirichlet shard gets: one 32-sample batch, but never more than a
    quarter of an equal share (so small data sets keep their skew), and at least 1."""
    return max(1, min(32, num_samples // (4 * peers)))


def partition(
    labels: torch.Tensor,
    peers: int,
    split: str,
    alpha: float,
    seed: int,
    *,
    gamma: float = 0.5,
    min_size: int | None = None,
) -> list[torch.Tensor]:
    """Disjoint int64 index shards, one per peer, that together cover ``range(len(labels))``.

    - ``"iid"``: a random permutation cut into ``peers`` near-equal parts (sizes differ by at most 1);
      ``alpha`` is ignored.
    - ``"dirichlet"``: for every class, the class's samples (shuffled) are cut among peers in proportions
      drawn from Dirichlet(alpha, ..., alpha); small ``alpha`` gives each peer few classes, large ``alpha``
      approaches iid. Then every peer is topped up to ``min_size`` samples (default
      ``default_min_size``): while some peer is short, it takes random samples from the currently largest
      shard. This rebalancing is bounded and deterministic (unlike the common "resample until every shard is
      big enough" loop, which can run forever for tiny alpha) and moves only a few samples, so the skew
      is preserved.
    - ``"extreme"``: the samples sorted by (label, index) and cut into ``peers`` contiguous near-equal
      shards, so each peer sees one or two labels (ByzFL's ``extreme_niid``); no randomness.
    - ``"gamma_similarity"``: a share ``gamma`` of the samples (floor(gamma * n), drawn at random) is
      dealt iid, the rest as ``"extreme"``; each peer gets one iid part and one extreme part. gamma = 1
      is iid, gamma = 0 extreme. ByzFL's ``gamma_similarity_niid`` takes the first floor(gamma * n)
      samples in data-set order as its iid share; here that share is a random draw from the seed.

    ByzFL splits among honest clients only; here every peer, Byzantine ones included, gets a shard.
    """
    y = np.asarray(torch.as_tensor(labels).detach().cpu().numpy()).reshape(-1)
    n = int(y.shape[0])
    if peers < 1:
        raise ValueError(f"partition: peers must be >= 1, got {peers}")
    if n < peers:
        raise ValueError(f"partition: cannot give each of {peers} peers a sample from {n} samples")
    shard = SPLITS.lookup(split, "split").obj
    shards = shard(y, peers, np.random.default_rng(seed), alpha=alpha, gamma=gamma, min_size=min_size)
    return [torch.from_numpy(np.sort(s).astype(np.int64)) for s in shards]


def _extreme(y: np.ndarray, idx: np.ndarray, peers: int) -> list[np.ndarray]:
    """``idx`` sorted by (label, index), cut into ``peers`` contiguous near-equal shards."""
    idx = np.sort(idx)
    order = np.argsort(y[idx], kind="stable")
    return np.array_split(idx[order], peers)


def _dirichlet(
    y: np.ndarray, peers: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(peers)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        proportions = rng.dirichlet(np.full(peers, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
        for p, chunk in enumerate(np.split(idx, cuts)):
            parts[p].append(chunk)
    shards = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    # Top up short shards from the largest one. Feasible because n >= peers * min_size: while a shard is
    # short, the largest shard holds more than min_size samples.
    sizes = np.array([len(s) for s in shards])
    for p in np.argsort(sizes, kind="stable"):
        while len(shards[p]) < min_size:
            donor = int(np.argmax([len(s) for s in shards]))
            take = min(min_size - len(shards[p]), len(shards[donor]) - min_size)
            pick = rng.permutation(len(shards[donor]))
            moved, kept = pick[:take], pick[take:]
            shards[p] = np.concatenate([shards[p], shards[donor][moved]])
            shards[donor] = shards[donor][kept]
    return shards


def _iid(y: np.ndarray, peers: int, rng: np.random.Generator, **_: object) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(y)), peers)


def _dirichlet_split(y, peers, rng, *, alpha: float, min_size: int | None, **_: object) -> list[np.ndarray]:
    n = len(y)
    if not alpha > 0:
        raise ValueError(f"partition: dirichlet alpha must be > 0, got {alpha}")
    if min_size is None:
        min_size = default_min_size(n, peers)
    if not 0 <= min_size <= n // peers:
        raise ValueError(
            f"partition: min_size must be in [0, {n // peers}] for {n} samples and {peers} peers, got {min_size}"
        )
    return _dirichlet(y, peers, float(alpha), min_size, rng)


def _extreme_split(y, peers, rng, **_: object) -> list[np.ndarray]:
    return _extreme(y, np.arange(len(y)), peers)


def _gamma_split(y, peers, rng, *, gamma: float, **_: object) -> list[np.ndarray]:
    if not 0 <= gamma <= 1:
        raise ValueError(f"partition: gamma_similarity gamma must be in [0, 1], got {gamma}")
    n = len(y)
    perm = rng.permutation(n)
    share = int(gamma * n)
    iid = np.array_split(perm[:share], peers)
    rest = _extreme(y, perm[share:], peers)
    return [np.concatenate([a, b]) for a, b in zip(iid, rest, strict=True)]


for _entry in (
    Entry("iid", "a random permutation cut into near-equal shards", obj=_iid),
    Entry(
        "dirichlet", "per class, proportions drawn from Dirichlet(task.alpha); small alpha: few classes per peer",
        obj=_dirichlet_split, variant="short shards topped up from the largest (bounded, deterministic)",
        reference="Hsu, Qi, Brown 2019",
    ),
    Entry(
        "gamma_similarity", "a share task.gamma dealt iid, the rest sorted by label (1: iid, 0: extreme)",
        obj=_gamma_split, variant="the iid share is a random draw (ByzFL: the first samples)",
        reference="ByzFL gamma_similarity_niid",
    ),
    Entry(
        "extreme", "sorted by label, contiguous shards: one or two labels per peer", obj=_extreme_split,
        reference="ByzFL extreme_niid",
    ),
):
    SPLITS.add(_entry)
