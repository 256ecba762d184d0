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
def _median_network(n: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Comparators that matter for the element of rank (n - 1) // 2 among n inputs (padded with +inf), as
    (a, b, keep_min, keep_max): an output that no later comparator reads is not computed."""
    size = 1
    while size < n:
        size *= 2
    needed = {(n - 1) // 2}
    kept = []
    for a, b in reversed(_batcher_pairs(size)):
        lo, hi = a in needed, b in needed
        if lo or hi:
            kept.append((a, b, lo, hi))
            needed |= {a, b}
    return tuple(reversed(kept))


#: bytes of one input slice per chunk: the network's ~n live slices then stay in a core's L2 cache
CHUNK_BYTES = 1 << 17


def lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The lower median of `x` along `dim` (same values as `torch.median(x, dim).values`).

    Large inputs are cut along another dimension into chunks whose working set fits in cache (the network
    reads every slice many times); each chunk's result is exact, so the chunking changes no value.
    """
    dim = dim % x.ndim
    n = x.shape[dim]
    cd = 1 if dim == 0 else 0  # the dimension to chunk along
    if x.ndim < 2 or n == 0:
        return _lower_median(x, dim)
    per_index = x.numel() // max(1, n * x.shape[cd]) * x.element_size()
    step = max(1, CHUNK_BYTES // max(1, per_index))
    if step >= x.shape[cd]:
        return _lower_median(x, dim)
    shape = list(x.shape)
    del shape[dim]
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    ocd = cd if cd < dim else cd - 1
    for start in range(0, x.shape[cd], step):
        length = min(step, x.shape[cd] - start)
        out.narrow(ocd, start, length).copy_(_lower_median(x.narrow(cd, start, length), dim))
    return out


def _lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The network on the whole of `x`.

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

    def buffer(*reuse: int) -> torch.Tensor | None:
        """An output buffer: an owned input slice (element-wise ops may write in place), else the pool."""
        for i in reuse:
            if owned[i]:
                owned[i] = False
                return vals[i]
        return pool.pop() if pool else None

    for a, b, keep_lo, keep_hi in _median_network(n):
        lo, hi = vals[a], vals[b]
        if hi is None:  # min(lo, +inf) = lo, max = +inf
            continue
        if lo is None:
            vals[a], vals[b] = hi, None
            owned[a], owned[b] = owned[b], False
            continue
        if keep_lo and keep_hi:
            buf = pool.pop() if pool else None
            new_lo = torch.minimum(lo, hi) if buf is None else torch.minimum(lo, hi, out=buf)
            buf = buffer(b)
            new_hi = torch.maximum(lo, hi) if buf is None else torch.maximum(lo, hi, out=buf)
            if owned[a]:
                pool.append(lo)
            vals[a], vals[b] = new_lo, new_hi
            owned[a] = owned[b] = True
            continue
        # one output is never read again: compute only the other one
        keep, drop, op = (a, b, torch.minimum) if keep_lo else (b, a, torch.maximum)
        buf = buffer(keep, drop)
        new = op(lo, hi) if buf is None else op(lo, hi, out=buf)
        if owned[keep]:
            pool.append(vals[keep])
        if owned[drop]:
            pool.append(vals[drop])
        vals[keep], vals[drop] = new, None
        owned[keep], owned[drop] = True, False
    m = (n - 1) // 2
    out = vals[m]
    assert out is not None
    return out if owned[m] else out.clone()
