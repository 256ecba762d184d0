"""Coordinate-wise lower median over the peer axis with a pruned sorting network.

CenteredClip starts at the coordinate median (lower middle value for even n, as `torch.median`). On a
(P, n, k) partition stack, `torch.median(dim=1)` sorts n-element columns one by one and costs about as much
as several CenteredClip iterations. A sorting network does the same selection with O(n log^2 n)
element-wise `minimum`/`maximum` calls over whole (P, k) slices, which vectorise; comparators that cannot
influence the median's position are pruned. min/max only select, so the result holds exactly the values
`torch.median` returns (up to the sign of zero: -0.0 == 0.0). Inputs must not contain NaN (the protocol
bans non-finite parts before aggregating).
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def _batcher_pairs(size: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort comparators for `size` (a power of two) inputs."""
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


@cache
def _median_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators that matter for the element of rank (n - 1) // 2 among n inputs (padded with +inf)."""
    size = 1
    while size < n:
        size *= 2
    needed = {(n - 1) // 2}
    kept = []
    for a, b in reversed(_batcher_pairs(size)):
        if a in needed or b in needed:
            kept.append((a, b))
            needed |= {a, b}
    return tuple(reversed(kept))


def lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The lower median of `x` along `dim` (same values as `torch.median(x, dim).values`).

    Intermediate slices are recycled through a small buffer pool (outputs written with `out=`), so the
    network allocates about as many slices as it has inputs instead of two per comparator.
    """
    n = x.shape[dim]
    vals: list[torch.Tensor | None] = list(x.unbind(dim))
    size = 1
    while size < n:
        size *= 2
    vals += [None] * (size - n)  # None stands for +inf padding
    owned = [False] * size  # whether vals[i] is our buffer (may be overwritten) or a view of x
    pool: list[torch.Tensor] = []
    for a, b in _median_network(n):
        lo, hi = vals[a], vals[b]
        if hi is None:
            continue
        if lo is None:
            vals[a], vals[b] = hi, None
            owned[a], owned[b] = owned[b], False
            continue
        new_lo = torch.minimum(lo, hi, out=pool.pop()) if pool else torch.minimum(lo, hi)
        if owned[b]:
            new_hi = torch.maximum(lo, hi, out=hi)  # element-wise: safe in place
        else:
            new_hi = torch.maximum(lo, hi, out=pool.pop()) if pool else torch.maximum(lo, hi)
        if owned[a]:
            pool.append(lo)
        vals[a], vals[b] = new_lo, new_hi
        owned[a] = owned[b] = True
    m = (n - 1) // 2
    out = vals[m]
    assert out is not None
    return out if owned[m] else out.clone()
