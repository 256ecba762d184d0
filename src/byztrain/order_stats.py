"""Coordinate-wise order statistics over one axis with pruned sorting networks.

CenteredClip starts at the coordinate median; the median and trimmed-mean aggregators are order
statistics too. `torch.median`/`torch.sort` along the peer axis of an (n, d) or (P, n, k) stack sort
n-element strided columns one by one: 28 ms for the median of 16 x 105,866 floats at one thread, 32 ms
for the sort (250 ms at n = 64). A sorting network does the same selection with O(n log^2 n) element-wise
`minimum`/`maximum` calls over whole slices, which vectorise (3.3 ms, 30 ms at n = 64); comparators that
cannot influence the requested ranks are pruned. min/max only select, so the results hold exactly the
values `torch.sort` puts at those ranks (up to the sign of zero: -0.0 == 0.0). Inputs must not contain
NaN (every caller rejects or bans them first).
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
def _network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """Comparators that matter for the elements of `ranks` (0 = smallest) among n inputs (padded with
    +inf), as (a, b, keep_min, keep_max): an output that no later comparator reads is not computed."""
    size = 1
    while size < n:
        size *= 2
    needed = set(ranks)
    kept = []
    for a, b in reversed(_batcher_pairs(size)):
        lo, hi = a in needed, b in needed
        if lo or hi:
            kept.append((a, b, lo, hi))
            needed |= {a, b}
    return tuple(reversed(kept))


#: bytes of one input slice per chunk: the network's ~n live slices then stay in a core's L2 cache
CHUNK_BYTES = 1 << 17


def _chunked(x: torch.Tensor, dim: int, ranks: tuple[int, ...], reduce) -> torch.Tensor:
    """``reduce(slices)`` of the order statistics ``ranks`` of `x` along `dim`, computed on chunks of the
    other axes whose working set fits in cache (the network reads every slice many times); each chunk's
    result is exact, so the chunking changes no value."""
    dim = dim % x.ndim
    n = x.shape[dim]
    if n == 0:
        raise ValueError("order statistics of an empty axis")
    if any(not 0 <= r < n for r in ranks):
        raise ValueError(f"ranks must lie in [0, {n}), got {ranks}")
    if not _network_pays(x, dim):
        return reduce(_sorted_select(x, dim, ranks))
    cd = 1 if dim == 0 else 0  # the dimension to chunk along
    if x.ndim < 2:
        return reduce(_select(x, dim, ranks))
    per_index = x.numel() // max(1, n * x.shape[cd]) * x.element_size()
    step = max(1, CHUNK_BYTES // max(1, per_index))
    if step >= x.shape[cd]:
        return reduce(_select(x, dim, ranks))
    shape = list(x.shape)
    del shape[dim]
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    ocd = cd if cd < dim else cd - 1
    for start in range(0, x.shape[cd], step):
        length = min(step, x.shape[cd] - start)
        out.narrow(ocd, start, length).copy_(reduce(_select(x.narrow(cd, start, length), dim, ranks)))
    return out


#: the network pays when a slice holds at least this many elements per input: its O(n log^2 n) calls each
#: carry a few microseconds of dispatch, which a short slice does not amortise (measured at one thread:
#: n = 16 wins from ~1,000 elements per slice, n = 512 loses 2x at 2,000)
NETWORK_MIN_SLICE_PER_INPUT = 16


def _network_pays(x: torch.Tensor, dim: int) -> bool:
    # off the CPU always: torch.median/kthvalue/sort have no deterministic CUDA kernels (runtime/device.py)
    n = x.shape[dim]
    return x.device.type != "cpu" or x.numel() // n >= NETWORK_MIN_SLICE_PER_INPUT * n


def _sorted_select(x: torch.Tensor, dim: int, ranks: tuple[int, ...]) -> list[torch.Tensor]:
    """The slices of rank `ranks` from torch's own selection (same values as the network's)."""
    if len(ranks) == 1:
        return [torch.kthvalue(x, ranks[0] + 1, dim=dim).values]
    s = torch.sort(x, dim=dim).values
    return [s.select(dim, r).clone() for r in ranks]  # compact, and each ours to modify


def lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The lower median of `x` along `dim` (the values of `torch.median(x, dim).values`)."""
    return _chunked(x, dim, ((x.shape[dim] - 1) // 2,), lambda s: s[0])


def upper_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The upper median of `x` along `dim` (rank n // 2; the lower one for odd n)."""
    return _chunked(x, dim, (x.shape[dim] // 2,), lambda s: s[0])


def average_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The median of `x` along `dim` with even n averaging the two middle values as 0.5*lo + 0.5*hi
    (cannot overflow where (lo + hi) / 2 can)."""
    n = x.shape[dim]
    if n % 2:
        return lower_median(x, dim)
    return _chunked(x, dim, (n // 2 - 1, n // 2), lambda s: s[0].mul_(0.5).add_(s[1].mul_(0.5)))


def trimmed_mean(x: torch.Tensor, dim: int, f: int) -> torch.Tensor:
    """Mean of the values of ranks f .. n - f - 1 along `dim` (drop the f smallest and the f largest),
    summed in rank order."""
    n = x.shape[dim]
    if f < 0 or n <= 2 * f:
        raise ValueError(f"trimmed_mean needs n > 2f (n={n}, f={f})")

    def mean(slices: list[torch.Tensor]) -> torch.Tensor:
        acc = slices[0]  # the slices are ours to modify
        for t in slices[1:]:
            acc.add_(t)
        return acc.div_(len(slices))

    return _chunked(x, dim, tuple(range(f, n - f)), mean)


def _select(x: torch.Tensor, dim: int, ranks: tuple[int, ...]) -> list[torch.Tensor]:
    """The network on the whole of `x`: the slices of rank `ranks`, in that order (ours to modify).

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

    for a, b, keep_lo, keep_hi in _network(n, ranks):
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
    result = []
    for r in ranks:
        out = vals[r]
        assert out is not None
        result.append(out if owned[r] else out.clone())
        owned[r] = False  # a rank listed twice gets its own copy
    return result
