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

Their registry entries (parameters, preconditions as config errors, references) and the binding of
``defense.*`` to them live in ``byztrain.rules``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any

import numpy as np
import torch

from byztrain import order_stats

__all__ = [
    "arc",
    "bucketing",
    "bulyan",
    "caf",
    "centered_clip",
    "centered_clip_batched",
    "clipped_clustering",
    "coordinate_median",
    "dnc",
    "fixed_point_residual",
    "geometric_median",
    "krum",
    "mda",
    "mean",
    "meamed",
    "monna",
    "multi_krum",
    "nnm",
    "sign_guard",
    "smea",
    "static_clipping",
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

    Starts at the coordinate mean of the finite rows (summed in float64 when the input dtype's sum
    overflows) and iterates
    ``z <- sum_i w_i x_i / sum_i w_i`` with ``w_i = 1 / max(||x_i - z||, nu)`` (``nu`` > 0 smooths the
    kink at data points, absolute units) until ``||step|| <= tol * (||z|| + h)``, where
    ``h = m / sum_i w_i`` is the harmonic mean of the smoothed distances (a data-scale term that
    outliers cannot inflate), or ``max_iters``. Rows holding +-inf are dropped (as ByzFL does).

    The first 50 iterations compute the distances from explicit differences in the input's dtype. A
    run still going after them (the median next to a cluster of identical rows, as under ALIE or IPM,
    takes hundreds) continues on the weights of ``z = a^T x``, the float64 Gram matrix of the rows
    centred at the current iterate and O(m^2) work per iteration instead of O(m d). A rounding bound on
    every distance is checked each iteration; past ``max(min(tol, 1e-6), eps) / 100`` of the squared
    distance the matrix is rebuilt at the current iterate, and if that does not help the iterations
    go back to explicit differences. The output is ``a^T x`` in the input's dtype.

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
    run = _Weiszfeld(xs, nu, tol, max_iters)
    run.explicit(_WEISZFELD_EXPLICIT_ITERS)
    if not run.converged and run.iterations < max_iters and run.gram():
        run.explicit(max_iters)
    if return_stats:
        return run.z, {
            "iterations": run.iterations,
            "step_norm": run.step_norm,
            "converged": run.converged,
            "dropped": dropped,
        }
    return run.z


_WEISZFELD_EXPLICIT_ITERS = 50


class _Weiszfeld:
    """Smoothed Weiszfeld iterations from the coordinate mean; see :func:`geometric_median`."""

    def __init__(self, xs: torch.Tensor, nu: float, tol: float, max_iters: int):
        self.xs, self.nu, self.tol, self.max_iters = xs, nu, tol, max_iters
        self.z = xs.mean(dim=0)
        if not bool(torch.isfinite(self.z).all()):  # the sum overflowed the dtype; the mean cannot
            self.z = xs.to(torch.float64).mean(dim=0).to(xs.dtype)
        self.a = torch.full((xs.shape[0],), 1.0 / xs.shape[0], dtype=torch.float64)  # z = a^T xs
        self.iterations, self.step_norm, self.converged = 0, math.inf, False

    def _stop(self, harmonic: float, z_norm: float) -> bool:
        self.converged = self.step_norm <= self.tol * (z_norm + harmonic)
        return self.converged

    def explicit(self, until: int) -> None:
        """Iterate on explicit differences in the input's dtype up to iteration ``until``."""
        xs = self.xs
        while self.iterations < min(until, self.max_iters):
            self.iterations += 1
            w = 1.0 / _row_norms(xs - self.z).clamp_min(self.nu)
            wsum = w.sum()
            self.a = w / wsum
            z_new = self.a.to(xs.dtype) @ xs
            self.step_norm = float(_row_norms(z_new - self.z))
            self.z = z_new
            if self._stop(float(xs.shape[0] / wsum), float(_row_norms(z_new))):
                return

    def gram(self) -> bool:
        """Iterate on the Gram matrix; True when its rounding stopped it before convergence."""
        x64 = self.xs.to(torch.float64)
        rho = max(min(self.tol, 1e-6), torch.finfo(self.xs.dtype).eps) / 100.0
        a, nu = self.a.cpu().numpy(), self.nu
        frame, fresh, coarse = _GramFrame(x64, a), True, False
        while self.iterations < self.max_iters:
            dist, err = frame.distances(a)
            coarse = bool((err > rho * np.maximum(dist, nu) ** 2).any())
            if coarse and fresh:
                break
            if coarse:  # the iterate moved away from the centre: centre again where it is
                frame, fresh = _GramFrame(x64, a), True
                continue
            self.iterations, fresh = self.iterations + 1, False
            w = 1.0 / np.maximum(dist, nu)
            wsum = float(w.sum())
            a_new = w / wsum
            self.step_norm = math.sqrt(frame.quad(a_new - a))
            a = a_new
            if self._stop(len(a) / wsum, frame.z_norm(a)):
                break
        self.a = torch.from_numpy(a)
        self.z = self.a.to(dtype=self.xs.dtype, device=self.xs.device) @ self.xs
        return coarse


class _GramFrame:
    """Rows ``x`` centred at ``r = a0^T x``: their float64 Gram matrix and what Weiszfeld needs from it.

    The (m, m) algebra runs in numpy on the CPU: m is the number of peers, so each iteration is a few
    microseconds of small-matrix work instead of a pass over the d coordinates.
    """

    def __init__(self, x64: torch.Tensor, a0: np.ndarray):
        r = torch.from_numpy(a0).to(x64.device) @ x64
        c = x64 - r
        self.c_norm = torch.linalg.vector_norm(c, dim=1).cpu().numpy()
        self.gram = (c @ c.T).cpu().numpy()
        self.c_r = (c @ r).cpu().numpy()
        self.r_sq = float(r @ r)
        # rounding of a length-d float64 dot product, typical (sqrt(d)) rather than worst-case (d) growth
        self.eps = (4.0 + math.sqrt(x64.shape[1])) * np.finfo(np.float64).eps

    def quad(self, u: np.ndarray) -> float:
        return max(float(u @ self.gram @ u), 0.0)

    def distances(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``||x_i - a^T x||`` and a bound on the rounding error of their squares."""
        ga = self.gram @ a
        sq = np.maximum(self.gram.diagonal() - 2.0 * ga + a @ ga, 0.0)
        spread = float(a @ self.c_norm)  # >= ||a^T c||, bounds every term's size
        return np.sqrt(sq), self.eps * (self.c_norm + spread) ** 2

    def z_norm(self, a: np.ndarray) -> float:
        return math.sqrt(max(self.r_sq + 2.0 * float(a @ self.c_r) + self.quad(a), 0.0))


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


def _cclip_prepare(parts: torch.Tensor, v: torch.Tensor, value_range: tuple[float, float]):
    """(parts with their +-inf rows zeroed, the (P, n) mask of finite rows or None when all are, whether
    the row norms may be taken in the input dtype without overflow)."""
    dtype, k = parts.dtype, parts.shape[2]
    lo, hi = value_range  # from _value_range: NaN already rejected
    finite = None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        # A row with +-inf has no defined clipped direction: it contributes nothing (weight 0) but still
        # counts in the 1/n. Zeroing it avoids 0 * inf = NaN in the weighted sum.
        finite = torch.isfinite(parts).all(dim=2)  # (P, n)
        parts = torch.where(finite[..., None], parts, torch.zeros((), dtype=dtype, device=parts.device))
        lo, hi = (float(t) for t in torch.aminmax(parts))
    vlo, vhi = (float(t) for t in torch.aminmax(v))
    bound = max(abs(lo), abs(hi), abs(vlo), abs(vhi))
    # float32 squares overflow above ~3.4e38; keep a wide margin for rounding in the sums. Other dtypes
    # (float16, bfloat16) always take the float64 norms.
    safe = dtype == torch.float64 or (dtype == torch.float32 and k * (2.0 * bound) ** 2 < 1e37)
    return parts, finite, safe


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
    parts, finite, safe = _cclip_prepare(parts, v, value_range)
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
    P, n, k = parts.shape
    lo, hi = _value_range(parts, "centered_clip_irls_batched", "parts", 3)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("centered_clip_irls_batched: parts must be finite")
    # float32 squared norms are safe while k * (2 * bound)^2 stays far below the float32 maximum. The choice
    # is made per partition, so that a partition's result does not depend on the others in the batch; when
    # the whole batch is safe so is every partition, and the per-partition pass is skipped.
    safe = [True] * P
    if parts.dtype != torch.float64 and k * (2.0 * max(-lo, hi)) ** 2 >= 1e37:
        safe = [k * (2.0 * b) ** 2 < 1e37 for b in parts.abs().amax(dim=(1, 2)).tolist()]
    v = _median(parts, 1, median)
    tiny = torch.finfo(parts.dtype).eps / 2
    stats = {"iterations": [], "converged": [], "clipped": []}
    diff = torch.empty(n, k, dtype=parts.dtype, device=parts.device)
    for p in range(P):
        it, done, far = _irls_solve(parts[p], v[p], diff, tau, tol, max_iters, safe[p], tiny)
        stats["iterations"].append(it)
        stats["converged"].append(done)
        stats["clipped"].append(far)
    dev = parts.device
    return v, {
        "iterations": torch.tensor(stats["iterations"], dtype=torch.int64, device=dev),
        "clipped": torch.stack(stats["clipped"]).to(torch.int64),
        "converged": torch.tensor(stats["converged"], dtype=torch.bool, device=dev),
    }


def _irls_solve(x, v, diff, tau, tol, max_iters, safe, tiny) -> tuple[int, bool, torch.Tensor]:
    """Iterate one partition ``x`` (n, k) from ``v`` (k,), updated in place; (iterations, converged,
    rows farther than tau at the output, as a 0-d tensor). One host sync per iteration."""
    r = torch.empty_like(v)
    for it in range(1, max_iters + 1):
        torch.sub(x, v, out=diff)
        dist = torch.linalg.vector_norm(diff, dim=1) if safe else _row_norms(diff).to(x.dtype)
        w = torch.div(tau, dist).clamp_(max=1.0)  # dist = 0 gives inf, clamped to 1
        torch.mv(diff.T, w, out=r)
        r_norm, mass, wsum = torch.stack((torch.linalg.vector_norm(r), w.dot(dist), w.sum())).tolist()
        if r_norm <= tol * mass:  # mass = sum_i w_i d_i = sum_i min(d_i, tau)
            return it, True, (dist > tau).sum()
        # float32 cannot resolve the fixed point any further (checked now and then: it costs a pass)
        if it % 16 == 0 and r_norm / wsum <= tiny * float(torch.linalg.vector_norm(v)):
            return it, False, (dist > tau).sum()
        v.add_(r.div_(wsum))
    return max_iters, False, (dist > tau).sum()


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


# ---- subset-enumerating rules (MDA, SMEA) -------------------------------------------------------------

# Enumerating C(n, f) subsets is exponential. These budgets bound the work to about a minute on one CPU
# thread (measured: MDA ~3e7 units of C(n, f) * (n - f)^2 per second at n = 20-22, SMEA ~7e7 units of
# C(n, f) * (n - f)^3 at n = 16-18); a larger size is refused with the count in the message.
MDA_MAX_WORK = 2e9  # C(n, f) * (n - f)^2
SMEA_MAX_WORK = 4e9  # C(n, f) * (n - f)^3
EIGEN_MODES = ("exact", "power")
CAF_TAU_MAX = ("weighted", "all")


def _check_subsets(n: int, f: int, rule: str, power: int, budget: float) -> None:
    count = math.comb(n, f)
    if count * (n - f) ** power > budget:
        raise ValueError(
            f"{rule} enumerates C(n, f) = C({n}, {f}) = {count} subsets, more than a minute of work "
            f"(limit C(n, f) * (n - f)^{power} <= {budget:.0e}); use fewer rows or a smaller f"
        )


def _check_half(n: int, f: int, rule: str) -> None:
    if 2 * f >= n:
        raise ValueError(f"{rule} needs n > 2f (n={n}, f={f})")


def _subset_batches(n: int, k: int, device, batch: int = 4096):
    """The k-subsets of range(n) in itertools.combinations order (ByzFL's, which fixes tie-breaking),
    as (B, k) index tensors."""
    it = itertools.combinations(range(n), k)
    while True:
        chunk = list(itertools.islice(it, batch))
        if not chunk:
            return
        yield torch.tensor(chunk, dtype=torch.long, device=device)


def mda(x: torch.Tensor, f: int) -> torch.Tensor:
    """Minimum-diameter averaging (El Mhamdi et al. 2020; ByzFL ``MDA``): the mean of the n - f rows
    whose largest pairwise L2 distance is smallest. Needs n > 2f. Ties go to the first subset in
    ``itertools.combinations`` order (ByzFL's). Enumerates C(n, f) subsets: sizes over
    :data:`MDA_MAX_WORK` are refused. Distances in float64 from explicit differences.
    """
    _check_x(x, "mda")
    f = _check_f(f, "mda")
    n, k = x.shape[0], x.shape[0] - f
    _check_half(n, f, "mda")
    _check_subsets(n, f, "mda", 2, MDA_MAX_WORK)
    dist = _pairwise_sq_dists(x)
    best, best_subset = math.inf, torch.arange(k)
    for subsets in _subset_batches(n, k, dist.device):
        diam = dist[subsets[:, :, None], subsets[:, None, :]].flatten(1).amax(dim=1)
        i = int(torch.argmin(diam))
        if float(diam[i]) < best:
            best, best_subset = float(diam[i]), subsets[i]
    return x[best_subset.to(x.device)].mean(dim=0)


def _gram_top_eigen(rows: torch.Tensor, weights: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue and unit eigenvector of ``sum_i w_i r_i r_i^T`` (d x d) through the n x n
    Gram matrix of ``sqrt(w_i) r_i``: the same nonzero spectrum, O(n^2 d) instead of O(d^2)."""
    m = rows * weights.sqrt()[:, None]
    lam, vecs = torch.linalg.eigh(m @ m.T)
    top = float(lam[-1])
    if top <= 0.0:
        return 0.0, torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    v = vecs[:, -1] @ m
    return top, v / torch.linalg.vector_norm(v)


def _power_step(rows: torch.Tensor, weights: torch.Tensor, generator: torch.Generator):
    """ByzFL's eigen-estimate: one power iteration from a standard-normal start drawn from
    ``generator`` (on the CPU, float32, as ByzFL's ``torch.randn``); returns (||w||, w / ||w||) for
    ``w = sum_i weights_i <r_i, v> r_i``."""
    v = torch.randn(rows.shape[1], generator=generator).to(rows.device, rows.dtype)
    v = v / torch.linalg.vector_norm(v)
    w = ((rows @ v) * weights) @ rows
    norm = torch.linalg.vector_norm(w)
    return float(norm), w / norm


def _check_eigen(eigen: str, generator: Any, rule: str) -> None:
    _check_choice(eigen, EIGEN_MODES, rule, "eigen")
    if eigen == "power" and not isinstance(generator, torch.Generator):
        raise ValueError(f"{rule} with eigen='power' needs a torch.Generator, got {type(generator).__name__}")


def smea(x: torch.Tensor, f: int, *, eigen: str = "exact", generator: torch.Generator | None = None):
    """Smallest maximum eigenvalue averaging (Allouah et al. 2023; ByzFL ``SMEA``): the mean of the
    n - f rows whose empirical covariance has the smallest largest eigenvalue. Needs n > 2f.

    ``eigen="exact"`` (default): each subset's largest eigenvalue exactly, from the (n - f)^2 centred
    Gram block of one float64 Gram matrix (centred on the coordinate median for precision), so the
    rule is deterministic. ``eigen="power"``: ByzFL 0.0.11's estimate, one power iteration per subset
    from a random start drawn from ``generator`` (with ``torch.manual_seed(s)`` before ByzFL's call and
    a generator seeded with s the two agree). Ties go to the first subset in combinations order.
    Sizes over :data:`SMEA_MAX_WORK` are refused.
    """
    _check_x(x, "smea")
    f = _check_f(f, "smea")
    _check_eigen(eigen, generator, "smea")
    n, k = x.shape[0], x.shape[0] - f
    _check_half(n, f, "smea")
    _check_subsets(n, f, "smea", 3, SMEA_MAX_WORK)
    if eigen == "power":
        return _smea_power(x, f, generator)
    xc = x.to(torch.float64) - _median(x, 0, "average").to(torch.float64)
    gram = xc @ xc.T
    centre = torch.eye(k, dtype=gram.dtype, device=gram.device) - 1.0 / k
    best, best_subset = math.inf, torch.arange(k)
    for subsets in _subset_batches(n, k, gram.device):
        block = centre @ gram[subsets[:, :, None], subsets[:, None, :]] @ centre
        top = torch.linalg.eigvalsh(block)[:, -1]
        i = int(torch.argmin(top))
        if float(top[i]) < best:
            best, best_subset = float(top[i]), subsets[i]
    return x[best_subset.to(x.device)].mean(dim=0)


def _smea_power(x: torch.Tensor, f: int, generator: torch.Generator) -> torch.Tensor:
    n, k = x.shape[0], x.shape[0] - f
    ones = torch.ones(k, dtype=x.dtype, device=x.device)
    best, best_subset = math.inf, tuple(range(k))
    for subset in itertools.combinations(range(n), k):
        rows = x[list(subset)]
        lam, _ = _power_step(rows - rows.mean(dim=0), ones, generator)
        if lam < best:
            best, best_subset = lam, subset
    return x[list(best_subset)].mean(dim=0)


# ---- neighbourhood and coordinate rules (MoNNA, Meamed) ------------------------------------------------


def monna(x: torch.Tensor, f: int, *, idx: int = 0) -> torch.Tensor:
    """MoNNA (Farhadkhani et al. 2023; ByzFL ``MoNNA``): the mean of the n - f rows nearest (L2) to row
    ``idx``, itself included. Needs n > 2f and 0 <= idx < n. The paper's setting is peer-to-peer, each
    honest peer centring on its own vector; a trusted server has no such row, so ``idx`` (default 0,
    ByzFL's) names a row it trusts. Ties go to the lower index.
    """
    _check_x(x, "monna")
    f = _check_f(f, "monna")
    idx = _check_int(idx, "monna", "idx", 0)
    n = x.shape[0]
    _check_half(n, f, "monna")
    if idx >= n:
        raise ValueError(f"monna needs idx < n (n={n}, idx={idx})")
    dist = torch.nan_to_num(_row_norms(x - x[idx]), nan=math.inf)
    dist[idx] = -1.0  # the centre first, even against exact duplicates
    nearest = torch.sort(dist, stable=True).indices[: n - f]
    return x[nearest.to(x.device)].mean(dim=0)


def meamed(x: torch.Tensor, f: int) -> torch.Tensor:
    """Mean around median (Xie et al. 2018; ByzFL ``Meamed``): per coordinate, the mean of the n - f
    values nearest the coordinate median (the average of the two middle values for even n, as ByzFL).
    Needs n > 2f. Ties in distance go to the lower row index.
    """
    _check_x(x, "meamed")
    f = _check_f(f, "meamed")
    n = x.shape[0]
    _check_half(n, f, "meamed")
    gap = (x - _median(x, 0, "average")).abs()
    nearest = torch.sort(gap, dim=0, stable=True).indices[: n - f]
    return torch.gather(x, 0, nearest).mean(dim=0)


# ---- covariance filter (CAF) ---------------------------------------------------------------------------


def caf(
    x: torch.Tensor,
    f: int,
    *,
    eigen: str = "exact",
    generator: torch.Generator | None = None,
    tau_max_over: str = "weighted",
):
    """Covariance-bound agnostic filter (Allouah, Guerraoui, Stephan 2025; ByzFL ``CAF``).

    Weights c_i start at 1. While sum c > n - 2f: mu = weighted mean, (lambda, v) the top eigenpair of
    the weighted covariance, tau_i = <x_i - mu, v>^2, c_i *= 1 - tau_i / max tau. Returns the mu seen
    with the smallest lambda. Needs n > 2f.

    ``tau_max_over="weighted"`` (default): max tau over the rows still weighted (c_i > 0), so every
    round zeroes one more row and the loop ends within n rounds. ``"all"``: over all rows, as ByzFL
    0.0.11; once a far outlier is at weight 0 its tau keeps max tau huge and the other weights barely
    move, so the loop can run for thousands of rounds (minutes per call against a sign-flipper).
    ByzFL's output is reproduced by ``eigen="power", tau_max_over="all"``.

    ``eigen="exact"`` (default): the exact top eigenpair (n x n Gram matrix, float64), deterministic.
    ``eigen="power"``: ByzFL 0.0.11's one power iteration from a random start drawn from ``generator``
    each round. When the weighted covariance is zero (every weighted row on mu) the loop stops: that mu
    has lambda = 0 (ByzFL divides by zero there). Rows holding +-inf are not accepted.
    """
    _check_x(x, "caf")
    f = _check_f(f, "caf")
    _check_eigen(eigen, generator, "caf")
    _check_choice(tau_max_over, CAF_TAU_MAX, "caf", "tau_max_over")
    n = x.shape[0]
    _check_half(n, f, "caf")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("caf: x must be finite (a covariance of +-inf rows is undefined)")
    work = x if eigen == "power" else x.to(torch.float64)
    c = torch.ones(n, dtype=work.dtype, device=x.device)
    best, best_mu = math.inf, None
    while float(c.sum()) > n - 2 * f:
        csum = c.sum()
        mu = (c @ work) / csum
        diffs = work - mu
        if eigen == "power":
            lam, v = _power_step(diffs, c / csum, generator)
        else:
            lam, v = _gram_top_eigen(diffs, c / csum)
        if best_mu is None or lam < best:
            best, best_mu = lam, mu
        tau = (diffs @ v).square()
        tau_max = tau.max() if tau_max_over == "all" else tau[c > 0].max()
        if not lam > 0 or not float(tau_max) > 0:
            break
        c = (c * (1 - tau / tau_max)).clamp_min(0)
    return best_mu.to(x.dtype)


# ---- Bulyan, DnC, SignGuard, ClippedClustering -----------------------------------------------------------


def bulyan(x: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan over Krum (El Mhamdi, Guerraoui, Rouault 2018). Needs n >= 4f + 3.

    Selection: theta = n - 2f times, run Krum on the rows not yet selected and move its choice to the
    selection set. Krum's score over r remaining rows sums the max(r - f - 2, 1) smallest squared
    distances to other remaining rows (the paper's n - f - 2 with n the current set size; the floor of 1
    keeps the last rounds defined); ties go to the lower index. Aggregation: per coordinate, the mean of
    the beta = theta - 2f selected values nearest the coordinate median of the selection (average median
    for even theta), ties to the lower index.
    """
    _check_x(x, "bulyan")
    f = _check_f(f, "bulyan")
    n = x.shape[0]
    if n < 4 * f + 3:
        raise ValueError(f"bulyan needs n >= 4f + 3 (n={n}, f={f})")
    dist = _pairwise_sq_dists(x)
    dist.fill_diagonal_(math.inf)
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = dist[remaining][:, remaining]
        k = max(len(remaining) - f - 2, 1)
        scores = torch.sort(sub, dim=1).values[:, :k].sum(dim=1) if len(remaining) > 1 else torch.zeros(1)
        selected.append(remaining.pop(int(torch.argmin(scores))))
    chosen = x[torch.tensor(selected, device=x.device)]
    beta = len(selected) - 2 * f
    gap = (chosen - _median(chosen, 0, "average")).abs()
    nearest = torch.sort(gap, dim=0, stable=True).indices[:beta]
    return torch.gather(chosen, 0, nearest).mean(dim=0)


def dnc(
    x: torch.Tensor,
    f: int,
    generator: torch.Generator,
    *,
    sub_dim: int = 10_000,
    iters: int = 5,
    filter_frac: float = 1.0,
) -> torch.Tensor:
    """Divide-and-conquer (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 2; Blades ``DnC`` defaults).

    Each of ``iters`` rounds draws ``sub_dim`` coordinates without replacement from ``generator`` (all
    of them when sub_dim >= d), centres the sub-vectors on their mean, scores each row by its squared
    projection on the top right singular vector, and keeps the n - floor(filter_frac * f) lowest
    scores. Returns the mean of the rows kept in every round (the full vectors). Needs
    n - floor(filter_frac * f) >= 1; if the rounds share no row, the rule falls back to the rows kept in
    the first round (the paper leaves that case open). Rows holding +-inf are not accepted.
    """
    _check_x(x, "dnc")
    f = _check_f(f, "dnc")
    sub_dim = _check_int(sub_dim, "dnc", "sub_dim", 1)
    iters = _check_int(iters, "dnc", "iters", 1)
    filter_frac = _check_real(filter_frac, "dnc", "filter_frac", positive=False)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"dnc: generator must be a torch.Generator, got {type(generator).__name__}")
    n, d = x.shape
    keep = n - math.floor(filter_frac * f)
    if keep < 1:
        raise ValueError(f"dnc needs n - floor(filter_frac * f) >= 1 (n={n}, f={f}, filter_frac={filter_frac})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("dnc: x must be finite (a singular vector of +-inf rows is undefined)")
    good, first = None, None
    for _ in range(iters):
        cols = torch.randperm(d, generator=generator, device=generator.device)[: min(sub_dim, d)]
        sub = x[:, cols.to(x.device)].to(torch.float64)
        centred = sub - sub.mean(dim=0)
        _, v = _gram_top_eigen(centred, torch.ones(n, dtype=sub.dtype, device=sub.device))
        scores = (centred @ v).square()
        kept = set(torch.sort(scores, stable=True).indices[:keep].tolist())
        first = kept if first is None else first
        good = kept if good is None else good & kept
    rows = sorted(good or first)
    return x[torch.tensor(rows, device=x.device)].mean(dim=0)


def _two_means(features: torch.Tensor) -> torch.Tensor:
    """Boolean membership of the larger of two Lloyd clusters of the rows of ``features`` (float64),
    started from the two rows farthest apart (lowest indices on ties); ties in size keep row 0's."""
    n = features.shape[0]
    dist = torch.cdist(features, features)
    if n < 2 or float(dist.max()) == 0.0:
        return torch.ones(n, dtype=torch.bool, device=features.device)
    i, j = divmod(int(torch.argmax(dist)), n)
    centres = features[[i, j]]
    label = None
    for _ in range(100):
        new = torch.cdist(features, centres).argmin(dim=1)
        if label is not None and bool((new == label).all()):
            break
        label = new
        centres = torch.stack([features[label == c].mean(dim=0) for c in (0, 1)])
    big = 1 if int(label.sum()) * 2 > n or (int(label.sum()) * 2 == n and int(label[0]) == 1) else 0
    return label == big


def sign_guard(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    low: float = 0.1,
    high: float = 3.0,
    coord_frac: float = 0.1,
) -> torch.Tensor:
    """SignGuard (Xu et al., ICDCS 2022, Algorithm 1).

    1. Norm filter: keep rows with ``low <= ||x_i|| / M <= high``, M the median norm (average median).
    2. Sign clustering: on ceil(coord_frac * d) coordinates drawn from ``generator``, each row's
       features are its fractions of positive, zero and negative entries; keep the larger of two
       clusters. The paper clusters with MeanShift; this variant uses 2-means (Lloyd, started from the
       two farthest rows), which needs no bandwidth and no extra dependency.
    3. Return the mean of the rows kept by both, each clipped to norm M. If none is kept by both,
       the rows kept by the norm filter are used.

    Rows holding +-inf fail the norm filter (their ratio is inf).
    """
    _check_x(x, "sign_guard")
    low = _check_real(low, "sign_guard", "low", positive=False)
    high = _check_real(high, "sign_guard", "high", positive=True)
    coord_frac = _check_real(coord_frac, "sign_guard", "coord_frac", positive=True)
    if low > high or coord_frac > 1:
        raise ValueError(f"sign_guard needs low <= high and 0 < coord_frac <= 1 (got {low}, {high}, {coord_frac})")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"sign_guard: generator must be a torch.Generator, got {type(generator).__name__}")
    n, d = x.shape
    norms = torch.nan_to_num(_row_norms(x), nan=math.inf)
    m = float(_median(norms[:, None], 0, "average")[0])
    ratio = norms / m if m > 0 else torch.where(norms > 0, math.inf, 1.0)
    by_norm = (ratio >= low) & (ratio <= high)
    cols = torch.randperm(d, generator=generator, device=generator.device)[: math.ceil(coord_frac * d)]
    s = torch.sign(x[:, cols.to(x.device)])
    features = torch.stack([(s > 0).double().mean(1), (s == 0).double().mean(1), (s < 0).double().mean(1)], 1)
    keep = by_norm & _two_means(features).to(by_norm.device)
    keep = keep if bool(keep.any()) else by_norm
    if not bool(keep.any()):
        raise ValueError("sign_guard: no row passes the norm filter (is every norm zero or non-finite?)")
    rows = x[keep.to(x.device)]
    scale = torch.clamp(m / norms[keep], max=1.0).to(x.dtype).to(x.device)
    return (rows * scale[:, None]).mean(dim=0)


def _average_linkage_two(dist: torch.Tensor) -> list[list[int]]:
    """Agglomerative clustering with average linkage down to two clusters (first pair on ties)."""
    clusters = [[i] for i in range(dist.shape[0])]
    while len(clusters) > 2:
        best, pair = math.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(dist[clusters[a]][:, clusters[b]].mean())
                if link < best:
                    best, pair = link, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return clusters


def clipped_clustering(
    x: torch.Tensor, *, max_tau: float = 1e5, history: torch.Tensor | None = None
) -> torch.Tensor:
    """ClippedClustering (Li et al. 2023, Blades ``Clippedclustering``, average linkage).

    Clip every row to tau = min(median of the norms, max_tau), cluster the clipped rows into two by
    agglomerative average linkage on cosine distance (1 - cosine similarity; a zero row has similarity 0
    to all), and return the mean of the larger cluster (the one holding row 0 on a tie). Blades takes the
    median over every norm seen since the start of training; pass those past norms as ``history`` (a
    1-D tensor, not modified) for that variant. The registered defense uses this step's norms only, so
    the rule is stateless and a resumed run gives the same result. Rows holding +-inf are not accepted.
    """
    _check_x(x, "clipped_clustering")
    max_tau = _check_real(max_tau, "clipped_clustering", "max_tau", positive=True, allow_inf=True)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("clipped_clustering: x must be finite (a clipped direction of +-inf is undefined)")
    n = x.shape[0]
    norms = _row_norms(x)
    seen = norms if history is None else torch.cat([history.to(norms), norms])
    tau = min(float(_median(seen[:, None], 0, "average")[0]), max_tau)
    scale = torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))
    clipped = x * scale.to(x.dtype)[:, None]
    if n < 3:
        return clipped.mean(dim=0)
    unit = clipped.to(torch.float64) / norms.mul(scale).clamp_min(1e-300)[:, None]
    dist = 1.0 - unit @ unit.T
    dist.fill_diagonal_(0.0)
    a, b = _average_linkage_two(dist)
    big = a if len(a) > len(b) or (len(a) == len(b) and 0 in a) else b
    return clipped[torch.tensor(big, device=x.device)].mean(dim=0)


# ---- clipping pre-aggregators (ARC, static clipping) -----------------------------------------------------


def _clip_rows(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scale every row with norm > threshold down to norm ``threshold``; a new tensor. A row holding
    +-inf is replaced by its limit direction (the signs of its infinite entries, normalised) at norm
    ``threshold``."""
    norms = _row_norms(x)
    out = x.clone()
    over = norms > threshold
    if not bool(over.any()):
        return out
    finite = torch.isfinite(norms)
    scale = (threshold / norms[over & finite]).to(x.dtype)
    out[over & finite] = x[over & finite] * scale[:, None]
    inf_rows = over & ~finite
    if bool(inf_rows.any()):
        s = torch.where(torch.isinf(x[inf_rows]), torch.sign(x[inf_rows]), torch.zeros((), dtype=x.dtype))
        out[inf_rows] = s / torch.linalg.vector_norm(s, dim=1, keepdim=True) * threshold
    return out


def static_clipping(x: torch.Tensor, c: float) -> torch.Tensor:
    """Static clipping (ByzFL ``Clipping(c)``): rows with L2 norm > c are scaled to norm c. c >= 0."""
    _check_x(x, "clipping")
    c = _check_real(c, "clipping", "c", positive=False)
    return _clip_rows(x, c)


def arc(x: torch.Tensor, f: int) -> torch.Tensor:
    """Adaptive robust clipping (Allouah et al. 2024; ByzFL ``ARC``): with k = floor(2f(n - f)/n), the
    k largest-norm rows are clipped to the (k + 1)-th largest norm (ByzFL 0.0.11's threshold: the
    largest norm among the rows left unclipped). k = 0 leaves x unchanged. Needs f < n; +-inf rows are
    clipped along their limit direction (see :func:`_clip_rows`).
    """
    _check_x(x, "arc")
    f = _check_f(f, "arc")
    n = x.shape[0]
    if f >= n:
        raise ValueError(f"arc needs f < n (n={n}, f={f})")
    k = (2 * f * (n - f)) // n
    if k == 0:
        return x.clone()
    norms = torch.nan_to_num(_row_norms(x), nan=math.inf)
    threshold = float(torch.sort(norms).values[n - k - 1])
    return _clip_rows(x, threshold)
