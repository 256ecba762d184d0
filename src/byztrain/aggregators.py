"""Robust aggregation rules and pre-aggregators on stacked vectors.

Every rule is a pure function of an ``(n, d)`` floating-point tensor ``x`` (one row per worker) and
returns a ``d``-vector; pre-aggregators return an ``(n', d)`` tensor. The functions never modify
their input, return the input's dtype and device, and check their preconditions before doing any
work, raising ``ValueError`` with the parameter name and the accepted values.

Peer libraries disagree on several definitions (Krum's neighbour count, the even-n median,
CenteredClip's start and stopping rule, Multi-Krum's output); each docstring states the variant
implemented here and the alternatives, and the choice is a parameter wherever it matters.

Non-finite inputs: NaN is rejected up front (a NaN message is a detectable fault, not a value to
aggregate). ``+-inf`` is accepted: order statistics sort it, Krum/NNM treat it as infinitely far,
geometric median and CenteredClip give such rows no weight, and the mean propagates it.

``AGGREGATORS`` / ``build_aggregator`` and ``PRE_AGGREGATORS`` / ``build_pre_aggregator`` are the
registry the runtime uses to bind configuration parameters (``defense.*``) to a rule.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from byztrain import order_stats
from byztrain.config import ConfigError

__all__ = [
    "AGGREGATORS",
    "PRE_AGGREGATORS",
    "BoundAggregator",
    "BoundPreAggregator",
    "bucketing",
    "build_aggregator",
    "build_pre_aggregator",
    "centered_clip",
    "centered_clip_batched",
    "coordinate_median",
    "fixed_point_residual",
    "geometric_median",
    "krum",
    "mean",
    "multi_krum",
    "nnm",
    "trimmed_mean",
]

MEDIAN_MODES = ("average", "lower", "upper")
KRUM_NEIGHBOURS = ("blanchard", "byzfl")


# ---- precondition helpers ------------------------------------------------------------------------


def _check_x(x: Any, rule: str, name: str = "x", ndim: int = 2, *, scan: bool = True) -> None:
    """Type, shape and dtype preconditions, then (``scan=True``) the NaN check. Callers passing
    ``scan=False`` must call :func:`_reject_nan` themselves when their own pass finds a non-finite value."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{rule}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        shape = "(n, d)" if ndim == 2 else "(P, n, k)"
        raise ValueError(f"{rule}: {name} must be a {ndim}-D tensor {shape}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{rule}: {name} must have a floating-point dtype, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{rule}: {name} must be non-empty, got shape {tuple(x.shape)}")
    # A finite total proves there is no NaN (and no inf) in one read of x; `isnan` writes a mask and
    # costs several times more. A non-finite total (NaN, inf, or a finite overflow) gets the exact scan.
    if scan and not bool(torch.isfinite(x.sum())):
        _reject_nan(x, rule, name, ndim)


def _reject_nan(x: torch.Tensor, rule: str, name: str = "x", ndim: int = 2) -> None:
    nan = torch.isnan(x)
    if nan.any():
        # Name the offending rows: a row is a worker, which is what the user needs to find.
        where = [tuple(i) if len(i) > 1 else i[0] for i in torch.nonzero(nan.any(dim=-1)).tolist()]
        what = "rows" if ndim == 2 else "(partition, row) pairs"
        raise ValueError(f"{rule}: {name} contains NaN in {what} {where[:10]}; NaN is not accepted")


def _check_int(value: Any, rule: str, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{rule}: {name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{rule}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(value: Any, rule: str, name: str, *, positive: bool, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{rule}: {name} must be a real number, got {value!r}")
    v = float(value)
    bad = math.isnan(v) or (positive and v <= 0) or (not positive and v < 0)
    bad = bad or (math.isinf(v) and not allow_inf)
    if bad:
        what = "> 0" if positive else ">= 0"
        finite = "" if allow_inf else " and finite"
        raise ValueError(f"{rule}: {name} must be {what}{finite}, got {value!r}")
    return v


def _check_choice(value: Any, choices: tuple[str, ...], rule: str, name: str) -> str:
    if value not in choices:
        raise ValueError(f"{rule}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_f(f: Any, rule: str) -> int:
    return _check_int(f, rule, "f", 0)


# ---- numerical helpers -----------------------------------------------------------------------------


def _row_norms(diff: torch.Tensor) -> torch.Tensor:
    """L2 norms over the last dim, returned in float64.

    The fast path reduces in the input dtype; rows whose norm overflowed (float32 squares above ~3e38)
    are recomputed with float64 accumulation, so huge-but-finite rows get a finite norm. Rows holding
    +-inf stay at inf (or NaN for inf - inf), which callers treat as "infinitely far".
    """
    norms = torch.linalg.vector_norm(diff, dim=-1).to(torch.float64)
    bad = ~torch.isfinite(norms)
    if diff.dtype != torch.float64 and bool(bad.any()):
        norms[bad] = torch.linalg.vector_norm(diff[bad], dim=-1, dtype=torch.float64)
    return norms


def _median(x: torch.Tensor, dim: int, even: str) -> torch.Tensor:
    """Coordinate median along `dim` through a sorting network (order_stats: the values torch.median /
    torch.sort give, 3-8x faster along the peer axis). `even` picks the value for even n."""
    if x.shape[dim] % 2 == 1 or even == "lower":
        return order_stats.lower_median(x, dim)  # torch.median's choice for even n
    if even == "upper":
        return order_stats.upper_median(x, dim)
    return order_stats.average_median(x, dim)


def _pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 squared L2 distances from explicit differences.

    The Gram expansion |a|^2 + |b|^2 - 2ab is ~5x faster but loses all precision when distances are
    small relative to norms (and overflows with huge rows), which is exactly the Byzantine regime.
    NaN (from inf - inf) becomes +inf: such pairs are treated as infinitely far apart.
    """
    n = x.shape[0]
    dist = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for i in range(n - 1):
        sq = _row_norms(x[i + 1 :] - x[i]).square()
        dist[i, i + 1 :] = sq
        dist[i + 1 :, i] = sq
    return torch.nan_to_num(dist, nan=math.inf)


# ---- aggregators --------------------------------------------------------------------------------------


def mean(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise arithmetic mean of the rows (the non-robust baseline; ByzFL ``Average``)."""
    _check_x(x, "mean")
    return x.mean(dim=0)


def coordinate_median(x: torch.Tensor, *, even: str = "average") -> torch.Tensor:
    """Coordinate-wise median.

    For odd n every convention agrees. For even n, ``even`` picks the value:

    - ``"average"`` (default): mean of the two middle values, as ``numpy.median`` and ByzFL
      (``torch.quantile(q=0.5)``), Flower ``FedMedian``.
    - ``"lower"``: the lower middle value, as ``torch.median`` (BTARD's ResNet CenteredClip start).
    - ``"upper"``: the upper middle value (sorted index n // 2), as upstream hivemind.

    Tolerates fewer than n/2 arbitrary rows per coordinate.
    """
    _check_x(x, "coordinate_median")
    _check_choice(even, MEDIAN_MODES, "coordinate_median", "even")
    return _median(x, 0, even)


def trimmed_mean(x: torch.Tensor, f: int) -> torch.Tensor:
    """Coordinate-wise trimmed mean: per coordinate drop the f smallest and f largest values, average
    the remaining n - 2f (Yin et al. 2018; ByzFL ``TrMean(f)``, epfml ``TM(b)``). Needs n > 2f.

    Alternatives: Flower ``FedTrimmedAvg`` and FLPoison take a trimmed *fraction* beta instead of a
    count. ``f = 0`` returns exactly :func:`mean`.
    """
    _check_x(x, "trimmed_mean")
    f = _check_f(f, "trimmed_mean")
    n = x.shape[0]
    if n <= 2 * f:
        raise ValueError(f"trimmed_mean needs n > 2f (n={n}, f={f})")
    if f == 0:
        return x.mean(dim=0)
    return order_stats.trimmed_mean(x, 0, f)


def _krum_neighbours(n: int, f: int, neighbours: str, rule: str) -> int:
    """Number of nearest neighbours a Krum score sums, after checking n against f."""
    _check_choice(neighbours, KRUM_NEIGHBOURS, rule, "neighbours")
    if neighbours == "blanchard":
        if n < 2 * f + 3:
            raise ValueError(f"{rule} needs n >= 2f + 3 (n={n}, f={f})")
        return n - f - 2
    if n < 2 * f + 1:
        raise ValueError(f"{rule} with neighbours='byzfl' needs n >= 2f + 1 (n={n}, f={f})")
    return n - f - 1


def _krum_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """Krum scores (float64, length n): sum of the k smallest squared distances to other rows."""
    dist = _pairwise_sq_dists(x)
    dist.fill_diagonal_(math.inf)  # exclude self by index, so an exact duplicate still counts
    return torch.sort(dist, dim=1).values[:, :k].sum(dim=1)


def krum(x: torch.Tensor, f: int, *, neighbours: str = "blanchard") -> torch.Tensor:
    """Krum (Blanchard et al. 2017): return the row whose summed squared L2 distance to its nearest
    neighbours is smallest.

    ``neighbours="blanchard"`` (default) sums the n - f - 2 nearest neighbours, as in the paper,
    Flower, Garfield and epfml; it needs n >= 2f + 3. ``neighbours="byzfl"`` sums n - f - 1 (ByzFL,
    FLPoison) and needs n >= 2f + 1. The two can select different rows on small n. Scores use squared
    L2 distances (the paper, ByzFL, Flower); FLPoison uses plain L2, epfml/fedlib the 4th power.
    Ties go to the lowest row index.
    """
    _check_x(x, "krum")
    f = _check_f(f, "krum")
    k = _krum_neighbours(x.shape[0], f, neighbours, "krum")
    scores = _krum_scores(x, k)
    return x[int(torch.argmin(scores))].clone()


def multi_krum(
    x: torch.Tensor, f: int, m: int | None = None, *, neighbours: str = "blanchard"
) -> torch.Tensor:
    """Multi-Krum: mean of the m rows with the best (lowest) Krum scores, all scored once.

    ``m`` defaults to n - f (ByzFL ``MultiKrum``); Garfield defaults to n - f - 2, Blanchard et al.
    leave it free, epfml returns the *sum* of the m rows and Flower weights by sample counts.
    Bulyan-style recursive selection (re-scoring after each pick) is a different rule. ``m = 1`` is
    :func:`krum`. Neighbour count and preconditions as in :func:`krum`; ties go to the lower index.
    """
    _check_x(x, "multi_krum")
    f = _check_f(f, "multi_krum")
    n = x.shape[0]
    k = _krum_neighbours(n, f, neighbours, "multi_krum")
    m = n - f if m is None else _check_int(m, "multi_krum", "m", 1)
    if m > n:
        raise ValueError(f"multi_krum needs 1 <= m <= n (n={n}, m={m})")
    order = torch.sort(_krum_scores(x, k), stable=True).indices[:m]
    return x[order.to(x.device)].mean(dim=0)


def geometric_median(
    x: torch.Tensor,
    *,
    nu: float = 1e-6,
    tol: float = 1e-6,
    max_iters: int = 1000,
    return_stats: bool = False,
):
    """Geometric median by smoothed Weiszfeld iterations (Pillutla et al.'s RFA smoothing).

    Starts at the coordinate mean of the finite rows and iterates
    ``z <- sum_i w_i x_i / sum_i w_i`` with ``w_i = 1 / max(||x_i - z||, nu)`` (``nu`` > 0 smooths the
    kink at data points, absolute units) until ``||step|| <= tol * (||z|| + h)``, where
    ``h = m / sum_i w_i`` is the harmonic mean of the smoothed distances (a data-scale term that
    outliers cannot inflate), or ``max_iters``. Rows holding +-inf are dropped (as ByzFL does).

    Alternatives: ByzFL ``GeometricMedian`` starts at 0 with nu = 0.1 and runs exactly T = 3
    iterations; Blades stops after 100; RFA stops on a relative change of the objective.

    With ``return_stats=True`` returns ``(vector, dict(iterations, step_norm, converged, dropped))``.
    """
    _check_x(x, "geometric_median")
    nu = _check_real(nu, "geometric_median", "nu", positive=True)
    tol = _check_real(tol, "geometric_median", "tol", positive=False)
    max_iters = _check_int(max_iters, "geometric_median", "max_iters", 1)

    finite = torch.isfinite(x).all(dim=1)
    dropped = int((~finite).sum())
    if dropped == x.shape[0]:
        raise ValueError("geometric_median needs at least one row without +-inf entries")
    xs = x if dropped == 0 else x[finite]
    m = xs.shape[0]
    z = xs.mean(dim=0)
    step_norm, converged, iterations = math.inf, False, 0
    while iterations < max_iters:
        iterations += 1
        w = 1.0 / _row_norms(xs - z).clamp_min(nu)
        wsum = w.sum()
        z_new = (w / wsum).to(xs.dtype) @ xs
        step_norm = float(_row_norms(z_new - z))
        z = z_new
        if step_norm <= tol * (float(_row_norms(z)) + float(m / wsum)):
            converged = True
            break
    if return_stats:
        return z, {
            "iterations": iterations,
            "step_norm": step_norm,
            "converged": converged,
            "dropped": dropped,
        }
    return z


# ---- CenteredClip ---------------------------------------------------------------------------------


def _check_start(start: Any, shape: tuple[int, ...], ref: torch.Tensor, rule: str) -> torch.Tensor:
    if not isinstance(start, torch.Tensor):
        raise ValueError(f"{rule}: start must be a torch.Tensor or None, got {type(start).__name__}")
    if tuple(start.shape) != shape:
        raise ValueError(f"{rule}: start must have shape {shape}, got {tuple(start.shape)}")
    # a finite sum proves every entry finite; otherwise (inf, NaN or a finite overflow) test exactly
    if not bool(torch.isfinite(start.sum())) and not bool(torch.isfinite(start).all()):
        raise ValueError(f"{rule}: start must be finite")
    return start.to(dtype=ref.dtype, device=ref.device)


def _value_range(x: torch.Tensor, rule: str, name: str, ndim: int) -> tuple[float, float]:
    """(min, max) of x in one pass, rejecting NaN (``aminmax`` propagates it): the NaN precondition and
    CenteredClip's finiteness and overflow tests from a single read."""
    lo, hi = (float(t) for t in torch.aminmax(x))
    if math.isnan(lo) or math.isnan(hi):
        _reject_nan(x, rule, name, ndim)
    return lo, hi


def _cclip_core(
    parts: torch.Tensor, tau: float, v: torch.Tensor, tol: float, max_iters: int, value_range: tuple[float, float]
):
    """Run P CenteredClips on ``parts`` (P, n, k) from ``v`` (P, k, owned by us: updated in place).

    The partitions are solved one after another, each until its own stopping test: a partition's n x k
    block (a few hundred KB in BTARD) stays in cache across its iterations, where a step over all P
    partitions at once streams the whole (P, n, k) stack from memory every iteration. A partition's
    iterates do not depend on the others, so the result is what P separate calls would give, bit for bit.

    One iteration is ``diff = x - v`` (into a reused buffer), the float32 row norms, the weights
    ``min(1, tau / dist)``, one matrix-vector product, ``v += step`` and one host sync for the stopping test.
    The norms are float32: a single pass over ``x`` bounds every ``|x_ij - v_j|`` (the iterates stay in the
    coordinate-wise box spanned by the rows and the start: each step is a convex combination), and when
    ``k * (2 * bound)^2`` could overflow float32 the iteration takes the float64 norms of :func:`_row_norms`.
    """
    P, n, k = parts.shape
    dev, dtype = parts.device, parts.dtype
    lo, hi = value_range  # from _value_range: NaN already rejected
    all_finite = math.isfinite(lo) and math.isfinite(hi)
    finite = None
    if not all_finite:
        # A row with +-inf has no defined clipped direction: it contributes nothing (weight 0) but still
        # counts in the 1/n. Zeroing it avoids 0 * inf = NaN in the weighted sum.
        finite = torch.isfinite(parts).all(dim=2)  # (P, n)
        parts = torch.where(finite[..., None], parts, torch.zeros((), dtype=dtype, device=dev))
        lo, hi = (float(t) for t in torch.aminmax(parts))
    vlo, vhi = (float(t) for t in torch.aminmax(v))
    bound = max(abs(lo), abs(hi), abs(vlo), abs(vhi))
    # float32 squares overflow above ~3.4e38; keep a wide margin for rounding in the sums. Other dtypes
    # (float16, bfloat16) always take the float64 norms.
    safe = dtype == torch.float64 or (dtype == torch.float32 and k * (2.0 * bound) ** 2 < 1e37)
    norm_dtype = dtype if safe else torch.float64
    tau_t = torch.tensor(tau, dtype=dtype, device=dev)
    one = torch.ones((), dtype=torch.float64, device=dev)
    diff = torch.empty(n, k, dtype=dtype, device=dev)
    sv = torch.empty(2, k, dtype=dtype, device=dev)  # row 0: the step, row 1: the iterate
    step, vp = sv[0], sv[1]
    iterations, step_norms, converged, clipped = [], [], [], []
    for p in range(P):
        x = parts[p]
        ok = None
        if finite is not None and not bool(finite[p].all()):
            ok = finite[p].to(dtype)
        vp.copy_(v[p])
        it, s_norm, done = 0, math.inf, False
        while it < max_iters:
            it += 1
            torch.sub(x, vp, out=diff)
            if safe:
                # min(1, tau / dist): finite dist here, so rows within the radius (dist = 0 included:
                # tau / 0 = inf) get exactly 1.
                scale = torch.div(tau_t, torch.linalg.vector_norm(diff, dim=1)).clamp_(max=1.0)
            else:
                dist = _row_norms(diff)  # float64, overflow-safe; inf only for rows holding +-inf
                scale = torch.where(dist > tau, tau / dist, one).to(dtype)
            if ok is not None:
                scale.mul_(ok)
            torch.mv(diff.T, scale, out=step)
            step.div_(n)
            vp.add_(step)
            # both norms in one call and one host sync (float32 when safe, as the row norms)
            s_norm, v_norm = torch.linalg.vector_norm(sv, dim=1, dtype=norm_dtype).tolist()
            if s_norm <= tol * (v_norm + tau):
                done = True
                break
        v[p].copy_(vp)
        torch.sub(x, vp, out=diff)
        far = (torch.linalg.vector_norm(diff, dim=1) if safe else _row_norms(diff)) > tau
        if ok is not None:
            far |= ~finite[p]
        iterations.append(it)
        step_norms.append(s_norm)
        converged.append(done)
        clipped.append(int(far.sum()))
    return v, {
        "iterations": torch.tensor(iterations, dtype=torch.int64, device=dev),
        "step_norm": torch.tensor(step_norms, dtype=torch.float64, device=dev),
        "clipped": torch.tensor(clipped, dtype=torch.int64, device=dev),
        "converged": torch.tensor(converged, dtype=torch.bool, device=dev),
    }


def _cclip_args(tau, tol, max_iters, median, rule):
    tau = _check_real(tau, rule, "tau", positive=True, allow_inf=True)
    tol = _check_real(tol, rule, "tol", positive=False)
    max_iters = _check_int(max_iters, rule, "max_iters", 1)
    _check_choice(median, MEDIAN_MODES, rule, "median")
    return tau, tol, max_iters


def centered_clip(
    x: torch.Tensor,
    tau: float,
    *,
    start: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iters: int = 1000,
    median: str = "lower",
    return_stats: bool = False,
):
    """CenteredClip (Karimireddy, He, Jaggi 2021) on whole rows.

    Iterates ``v <- v + mean_i[min(1, tau / ||x_i - v||) (x_i - v)]`` until
    ``||step|| <= tol * (||v|| + tau)`` (relative rule, so it also converges at large scale) or
    ``max_iters``; a converged output satisfies :func:`fixed_point_residual` ~ 0.

    Start: the coordinate median, ``median="lower"`` (default, ``torch.median`` as in BTARD's ResNet
    code), ``"upper"`` (upstream hivemind) or ``"average"``; or ``start`` if given (Karimireddy et
    al.'s momentum variant passes the previous output). The start changes iterates and iteration
    counts, not the fixed point when it is unique. ``tau = inf`` gives the mean after one step.

    Alternatives: ByzFL/epfml/FLPoison start at 0 (or the previous output) and run a fixed 1 to 5
    iterations; BTARD's ResNet code stops on an *absolute* 1e-6 step, its ALBERT fork after 20 steps.

    Rows with +-inf contribute nothing but count in the mean. With ``return_stats=True`` returns
    ``(vector, dict(iterations, step_norm, clipped, converged))``; ``clipped`` counts rows with
    ``||x_i - v|| > tau`` at the output.
    """
    _check_x(x, "centered_clip", scan=False)
    tau, tol, max_iters = _cclip_args(tau, tol, max_iters, median, "centered_clip")
    value_range = _value_range(x, "centered_clip", "x", 2)
    if start is None:
        v = _median(x, 0, median)
    else:
        v = _check_start(start, (x.shape[1],), x, "centered_clip").clone()
    out, stats = _cclip_core(x[None], tau, v[None], tol, max_iters, value_range)
    out = out[0]
    if return_stats:
        return out, {
            "iterations": int(stats["iterations"][0]),
            "step_norm": float(stats["step_norm"][0]),
            "clipped": int(stats["clipped"][0]),
            "converged": bool(stats["converged"][0]),
        }
    return out


def centered_clip_batched(
    parts: torch.Tensor,
    tau: float,
    *,
    tol: float = 1e-6,
    max_iters: int = 1000,
    median: str = "lower",
    start: torch.Tensor | None = None,
):
    """P independent CenteredClips over ``parts`` of shape (P, n, k), vectorised (BTARD's ButterflyClip:
    partition p holds the n workers' p-th slices).

    Same rule, start and stopping test as :func:`centered_clip`, applied per partition; a partition that
    has converged stops changing while the others iterate, so each result matches :func:`centered_clip`
    on that partition up to float rounding. ``start`` is an optional (P, k) tensor.

    Returns ``(result (P, k), stats)`` with per-partition tensors ``iterations`` (P,) int64,
    ``step_norm`` (P,) float64, ``clipped`` (P,) int64, ``converged`` (P,) bool.
    """
    _check_x(parts, "centered_clip_batched", name="parts", ndim=3, scan=False)
    tau, tol, max_iters = _cclip_args(tau, tol, max_iters, median, "centered_clip_batched")
    value_range = _value_range(parts, "centered_clip_batched", "parts", 3)
    P, _, k = parts.shape
    if start is None:
        v = _median(parts, 1, median)
    else:
        v = _check_start(start, (P, k), parts, "centered_clip_batched").clone()
    return _cclip_core(parts, tau, v, tol, max_iters, value_range)


def centered_clip_irls_batched(
    parts: torch.Tensor,
    tau: float,
    *,
    tol: float = 1e-6,
    max_iters: int = 1000,
    median: str = "lower",
):
    """BTARD's per-partition CenteredClip, solved to its fixed point by iteratively reweighted averaging.

    The fixed point is CenteredClip's: ``r(v) = sum_i w_i (x_i - v) = 0`` with ``w_i = min(1, tau / d_i)``,
    ``d_i = ||x_i - v||``. The iteration is ``v <- v + r(v) / sum_i w_i`` (the weighted mean of the rows
    with the current weights), where Karimireddy et al.'s rule steps by ``r(v) / n``. With small tau most
    rows are clipped, ``sum_i w_i << n``, and the 1/n step crawls (thousands of iterations at tau = 0.01);
    the reweighted step is the IRLS iteration of the Huber objective ``sum_i rho_tau(d_i)``, which
    decreases it monotonically and converges in tens of iterations for any tau.

    Stopping rule, the same quantity BTARD's check tests: stop at the first iterate whose residual
    satisfies ``||r(v)|| <= tol * sum_i min(d_i, tau)`` and return *that* iterate (not a further step),
    so the published value is the one whose residual was measured. The scale ``sum_i min(d_i, tau)`` is
    at most ``n * tau`` whatever the rows are. When float32 can no longer move the iterate (the step is
    below the iterate's rounding) the iteration stops unconverged.

    Input: finite (P, n, k) float tensor. Returns ``(result (P, k), stats)`` as
    :func:`centered_clip_batched`; each partition is solved on its own, so a partition's result does
    not depend on the others (bit for bit).
    """
    _check_x(parts, "centered_clip_irls_batched", name="parts", ndim=3, scan=False)
    tau, tol, max_iters = _cclip_args(tau, tol, max_iters, median, "centered_clip_irls_batched")
    if not math.isfinite(tau):
        raise ValueError("centered_clip_irls_batched: tau must be finite")
    lo, hi = _value_range(parts, "centered_clip_irls_batched", "parts", 3)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("centered_clip_irls_batched: parts must be finite")
    P, n, k = parts.shape
    v = _median(parts, 1, median)
    # float32 squared norms are safe while k * (2 * bound)^2 stays far below the float32 maximum; decided
    # per partition, so that a partition's result does not depend on the others in the batch
    bound = parts.abs().amax(dim=(1, 2)).tolist() if parts.dtype != torch.float64 else [0.0] * P
    tiny = torch.finfo(parts.dtype).eps / 2
    stats = {"iterations": [], "converged": [], "clipped": []}
    diff = torch.empty(n, k, dtype=parts.dtype, device=parts.device)
    for p in range(P):
        safe = k * (2.0 * bound[p]) ** 2 < 1e37
        it, done, far = _irls_solve(parts[p], v[p], diff, tau, tol, max_iters, safe, tiny)
        stats["iterations"].append(it)
        stats["converged"].append(done)
        stats["clipped"].append(far)
    dev = parts.device
    return v, {
        "iterations": torch.tensor(stats["iterations"], dtype=torch.int64, device=dev),
        "clipped": torch.tensor(stats["clipped"], dtype=torch.int64, device=dev),
        "converged": torch.tensor(stats["converged"], dtype=torch.bool, device=dev),
    }


def _irls_solve(x, v, diff, tau, tol, max_iters, safe, tiny) -> tuple[int, bool, int]:
    """Iterate one partition ``x`` (n, k) from ``v`` (k,), updated in place; (iterations, converged,
    rows farther than tau at the output)."""
    for it in range(1, max_iters + 1):
        torch.sub(x, v, out=diff)
        dist = torch.linalg.vector_norm(diff, dim=1) if safe else _row_norms(diff).to(x.dtype)
        w = torch.clamp(tau / dist, max=1.0)  # dist = 0 gives inf, clamped to 1
        r = torch.mv(diff.T, w)
        r_norm, mass, wsum, v_norm = torch.stack(
            [torch.linalg.vector_norm(r), torch.clamp(dist, max=tau).sum(), w.sum(), torch.linalg.vector_norm(v)]
        ).tolist()
        if r_norm <= tol * mass:
            return it, True, int((dist > tau).sum())
        step = r.div_(wsum)
        if r_norm / wsum <= tiny * v_norm:  # float32 cannot resolve the fixed point any further
            return it, False, int((dist > tau).sum())
        v.add_(step)
    return max_iters, False, int((dist > tau).sum())


def fixed_point_residual(x: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """``sum_i min(1, tau / ||x_i - v||) (x_i - v)`` in float64 (zero at a CenteredClip fixed point).

    Accepts batched shapes: ``x`` (..., n, d) with ``v`` (..., d); returns (..., d) float64.
    """
    tau = _check_real(tau, "fixed_point_residual", "tau", positive=True, allow_inf=True)
    diff = x.to(torch.float64) - v.to(torch.float64)[..., None, :]
    dist = torch.linalg.vector_norm(diff, dim=-1)
    scale = torch.where(dist > tau, tau / dist, torch.ones((), dtype=dist.dtype, device=dist.device))
    return (scale[..., None] * diff).sum(dim=-2)


# ---- pre-aggregators ------------------------------------------------------------------------------


def bucketing(x: torch.Tensor, s: int, generator: torch.Generator) -> torch.Tensor:
    """Bucketing (Karimireddy, He, Jaggi 2022): shuffle the rows with a permutation drawn from the
    explicit ``generator``, average consecutive buckets of ``s`` rows; a remainder of n mod s rows forms
    one smaller last bucket (as ByzFL). Returns ceil(n / s) rows; ``s >= n`` gives one bucket (the mean).

    Peer libraries draw the permutation from the global RNG; here it never touches global state. The
    permutation is drawn on the generator's device and moved to ``x``'s device.
    """
    _check_x(x, "bucketing")
    s = _check_int(s, "bucketing", "s", 1)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"bucketing: generator must be a torch.Generator, got {type(generator).__name__}")
    n, d = x.shape
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    shuffled = x[perm]
    full = n // s
    out = [shuffled[: full * s].reshape(full, s, d).mean(dim=1)] if full else []
    if n % s:
        out.append(shuffled[full * s :].mean(dim=0, keepdim=True))
    return torch.cat(out, dim=0)


def nnm(x: torch.Tensor, f: int) -> torch.Tensor:
    """Nearest-neighbour mixing (Allouah et al. 2023): replace each row by the mean of its n - f nearest
    neighbours in L2, itself included (ties to the lower index). Needs 0 <= f < n; ``f = 0`` replaces
    every row by the mean. Same definition as ByzFL ``NNM``.
    """
    _check_x(x, "nnm")
    f = _check_f(f, "nnm")
    n = x.shape[0]
    if f >= n:
        raise ValueError(f"nnm needs f < n (n={n}, f={f})")
    dist = _pairwise_sq_dists(x)
    dist.fill_diagonal_(-1.0)  # self always first, even against exact duplicates
    nearest = torch.sort(dist, dim=1, stable=True).indices[:, : n - f]
    mix = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    mix.scatter_(1, nearest.to(x.device), 1.0 / (n - f))
    return mix @ x


# ---- registry ---------------------------------------------------------------------------------------

AGGREGATORS: dict[str, Callable[..., Any]] = {
    "mean": mean,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "geometric_median": geometric_median,
    "cclip_ps": centered_clip,
}

PRE_AGGREGATORS: dict[str, Callable[..., Any]] = {"bucketing": bucketing, "nnm": nnm}

# Accepted ``defense.params`` per rule: key -> (kind, default). Kinds: "int" (>= 1), "real>=0",
# "bool", or a tuple of accepted strings. None as default = not set.
_PARAMS: dict[str, dict[str, tuple[Any, Any]]] = {
    "mean": {},
    "median": {"even": (MEDIAN_MODES, "average")},
    "trimmed_mean": {},
    "krum": {"neighbours": (KRUM_NEIGHBOURS, "blanchard")},
    "multi_krum": {"neighbours": (KRUM_NEIGHBOURS, "blanchard"), "m": ("int", None)},
    "geometric_median": {"nu": ("real>0", 1e-6), "tol": ("real>=0", 1e-6), "max_iters": ("int", 1000)},
    "cclip_ps": {
        "iters": ("int", None),
        "momentum": ("bool", False),
        "tol": ("real>=0", 1e-6),
        "max_iters": ("int", 1000),
        "median": (MEDIAN_MODES, "lower"),
    },
}
_PRE_PARAMS: dict[str, dict[str, tuple[Any, Any]]] = {"bucketing": {"bucket_size": ("int", 2)}, "nnm": {}}


def _unknown(value: Any, choices, field: str) -> ConfigError:
    choices = sorted(choices)
    hint = difflib.get_close_matches(str(value), choices, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(field, f"unknown value {value!r}{extra}; accepted: {', '.join(choices)}")


def _keys(specs: dict[str, dict[str, tuple[Any, Any]]]) -> set[str]:
    return {key for spec in specs.values() for key in spec}


def _bind_params(
    name: str, params: dict | None, spec: dict[str, tuple[Any, Any]], prefix: str, shared: set[str]
) -> dict:
    """Validate ``params`` against ``spec`` and fill defaults. Keys in ``shared`` belong to the other
    rules of the same defense (one ``defense.params`` mapping feeds the pre-aggregators and the rule) and
    are skipped; any other unknown key is an error."""
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ConfigError(prefix, f"must be a mapping, got {type(params).__name__}")
    out = {}
    for key, value in params.items():
        field = f"{prefix}.{key}"
        if key not in spec and key in shared:
            continue
        if key not in spec:
            accepted = ", ".join(sorted(spec)) or "none"
            hint = difflib.get_close_matches(str(key), list(spec), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(field, f"unknown parameter for {name!r}{extra}; accepted: {accepted}")
        kind = spec[key][0]
        if kind == "int":
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
            msg = f"must be an int >= 1, got {value!r}"
        elif kind == "bool":
            ok, msg = isinstance(value, bool), f"must be true or false, got {value!r}"
        elif kind in ("real>0", "real>=0"):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > 0 if kind == "real>0" else value >= 0)
            msg = f"must be a finite number {kind[4:]}, got {value!r}"
        else:
            ok, msg = value in kind, f"must be one of {', '.join(map(repr, kind))}, got {value!r}"
        if not ok:
            raise ConfigError(field, msg)
        out[key] = value
    return {key: out.get(key, default) for key, (_, default) in spec.items()}


class BoundAggregator:
    """An aggregation rule with its parameters bound, for exactly ``n`` input rows.

    Calling it with an (n, d) tensor returns the aggregate. ``last_stats`` holds the iterative rules'
    stats from the latest call (None for the others). Stateless unless built as ``cclip_ps`` with
    ``momentum=True``: then each call starts from the previous output (Karimireddy et al.'s
    momentum-style CenteredClip), so calls must come in step order and ``reset()`` forgets the state.
    """

    def __init__(
        self,
        name: str,
        n: int,
        fn: Callable[[torch.Tensor], Any],
        *,
        with_stats: bool,
        stateful: bool = False,
    ):
        self.name = name
        self.n = n
        self.stateful = stateful
        self.last_stats: dict | None = None
        self._fn = fn
        self._with_stats = with_stats
        self._prev: torch.Tensor | None = None

    def reset(self) -> None:
        self._prev = None
        self.last_stats = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[0] != self.n:
            raise ValueError(f"aggregator {self.name!r} was built for n={self.n} rows, got {x.shape[0]}")
        kwargs = {}
        if self.stateful and self._prev is not None and self._prev.shape[0] == x.shape[-1]:
            kwargs["start"] = self._prev
        out = self._fn(x, **kwargs)
        if self._with_stats:
            out, self.last_stats = out
        if self.stateful:
            self._prev = out.detach().clone()  # the caller may modify the returned tensor in place
        return out

    def __repr__(self) -> str:
        return f"BoundAggregator({self.name!r}, n={self.n})"


def build_aggregator(name: str, *, f: int, tau: float, params: dict | None, n: int) -> BoundAggregator:
    """Bind ``defense.*`` settings to a rule from :data:`AGGREGATORS` for inputs of ``n`` rows.

    Checks every precondition against ``n`` now and raises ``ConfigError`` (a ``ValueError``) naming
    ``defense.name``, ``defense.f``, ``defense.tau`` or ``defense.params.<key>``. ``n`` is the number of
    rows the rule receives, i.e. after any pre-aggregator (see ``BoundPreAggregator.output_rows``).

    Parameters (``defense.params``): median ``even``; krum ``neighbours``; multi_krum ``neighbours``,
    ``m``; geometric_median ``nu``, ``tol``, ``max_iters``; cclip_ps ``tol``, ``max_iters``, ``median``,
    ``iters`` (run exactly that many iterations, no convergence test, as ByzFL/ALBERT; excludes ``tol``
    and ``max_iters``) and ``momentum`` (start from the previous output; makes the callable stateful).
    The same mapping may carry the pre-aggregators' keys (skipped here); any other key is an error.
    """
    if name not in AGGREGATORS:
        raise _unknown(name, AGGREGATORS, "defense.name")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"build_aggregator: n must be an int >= 1, got {n!r}")
    if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
        raise ConfigError("defense.f", f"must be an int >= 0, got {f!r}")
    # The pre-aggregators' keys may share the mapping; another rule's keys are a mistake (one rule per defense).
    p = _bind_params(name, params, _PARAMS[name], "defense.params", _keys(_PRE_PARAMS))

    def need(ok: bool, field: str, msg: str) -> None:
        if not ok:
            raise ConfigError(field, msg)

    if name == "mean":
        return BoundAggregator(name, n, mean, with_stats=False)
    if name == "median":
        return BoundAggregator(name, n, lambda x: coordinate_median(x, even=p["even"]), with_stats=False)
    if name == "trimmed_mean":
        need(n > 2 * f, "defense.f", f"trimmed_mean needs n > 2f (n={n}, f={f})")
        return BoundAggregator(name, n, lambda x: trimmed_mean(x, f), with_stats=False)
    if name in ("krum", "multi_krum"):
        try:
            _krum_neighbours(n, f, p["neighbours"], name)
        except ValueError as err:
            raise ConfigError("defense.f", str(err)) from None
        if name == "krum":
            return BoundAggregator(
                name, n, lambda x: krum(x, f, neighbours=p["neighbours"]), with_stats=False
            )
        m = p["m"]
        need(m is None or m <= n, "defense.params.m", f"multi_krum needs 1 <= m <= n (n={n}, m={m})")
        return BoundAggregator(
            name, n, lambda x: multi_krum(x, f, m, neighbours=p["neighbours"]), with_stats=False
        )
    if name == "geometric_median":
        return BoundAggregator(
            name,
            n,
            lambda x: geometric_median(
                x, nu=p["nu"], tol=p["tol"], max_iters=p["max_iters"], return_stats=True
            ),
            with_stats=True,
        )
    # cclip_ps
    ok_tau = isinstance(tau, numbers.Real) and not isinstance(tau, bool) and not math.isnan(tau) and tau > 0
    need(ok_tau, "defense.tau", f"must be > 0, got {tau!r}")
    tol, max_iters = p["tol"], p["max_iters"]
    if p["iters"] is not None:
        given = params or {}
        need(
            "tol" not in given and "max_iters" not in given,
            "defense.params.iters",
            "fixes the iteration count; do not combine it with tol or max_iters",
        )
        tol, max_iters = 0.0, p["iters"]

    def run(x: torch.Tensor, start: torch.Tensor | None = None):
        return centered_clip(
            x, tau, start=start, tol=tol, max_iters=max_iters, median=p["median"], return_stats=True
        )

    return BoundAggregator(name, n, run, with_stats=True, stateful=p["momentum"])


class BoundPreAggregator:
    """A pre-aggregator with its parameters bound: (n, d) tensor -> (output_rows(n), d) tensor."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], rows: Callable[[int], int]):
        self.name = name
        self._fn = fn
        self._rows = rows

    def output_rows(self, n: int) -> int:
        """Rows produced from n input rows (what the following aggregator must be built for)."""
        return self._rows(n)

    output_count = output_rows  # the name byztrain.defenses looks up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def __repr__(self) -> str:
        return f"BoundPreAggregator({self.name!r})"


def build_pre_aggregator(
    name: str, *, f: int, params: dict | None, generator: torch.Generator | None, n: int | None = None
) -> BoundPreAggregator:
    """Bind a pre-aggregator from :data:`PRE_AGGREGATORS`.

    ``bucketing`` takes ``bucket_size`` (default 2) and needs the explicit ``generator`` (its state
    advances on every call, so runs are reproducible from the generator's seed); ``nnm`` uses ``f`` and,
    when ``n`` is given, checks f < n now. Errors name ``defense.pre``, ``defense.f`` or
    ``defense.params.<key>``. Keys of the other registered rules are skipped (one ``defense.params``
    mapping feeds the whole pipeline); a key no rule knows is an error.
    """
    if name not in PRE_AGGREGATORS:
        raise _unknown(name, PRE_AGGREGATORS, "defense.pre")
    if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
        raise ConfigError("defense.f", f"must be an int >= 0, got {f!r}")
    p = _bind_params(name, params, _PRE_PARAMS[name], "defense.params", _keys(_PARAMS) | _keys(_PRE_PARAMS))
    if name == "bucketing":
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"bucketing needs an explicit torch.Generator, got {type(generator).__name__}")
        s = p["bucket_size"]
        return BoundPreAggregator(name, lambda x: bucketing(x, s, generator), lambda rows: -(-rows // s))
    if n is not None and f >= n:
        raise ConfigError("defense.f", f"nnm needs f < n (n={n}, f={f})")
    return BoundPreAggregator(name, lambda x: nnm(x, f), lambda rows: rows)
