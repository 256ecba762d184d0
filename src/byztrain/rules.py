"""The aggregation rules and pre-aggregators as plugins: their registry entries and their binding to config.

`byztrain.aggregators` holds the pure rules on an (n, d) tensor; this module says, for each, what
`defense.params` it takes, which preconditions it has (as config errors naming the field), which variant and
reference it implements, and how config binds to it. Adding a rule is one function in `aggregators` (or
anywhere) plus one `AGGREGATORS.add(Entry(...))` here or in the caller's own module::

    AGGREGATORS.add(Entry("first", "the first row", obj=lambda r: lambda x: x[0].clone()))

An aggregator entry's ``obj`` is a binder: it takes a :class:`Bound` (rows n, f, tau, the checked parameters,
the defense's generator) and returns the callable ``(n, d) tensor -> d-vector``; its ``check`` takes the same
and raises ConfigError. ``extra`` may say ``stats=True`` (the callable returns ``(vector, stats dict)``) or
``random=<predicate on params>`` (the rule draws from the generator). A pre-aggregator entry's binder returns
``(n, d) -> (rows, d)``; ``extra["rows"](n, params)`` is its output row count when it is not n.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from byztrain import aggregators as A
from byztrain.errors import ConfigError
from byztrain.registry import AGGREGATORS, BOOL, PRE_AGGREGATORS, Choice, Entry, Int, Param, Real

__all__ = ["AGGREGATORS", "PRE_AGGREGATORS", "Bound", "BoundAggregator", "BoundPreAggregator", "build_aggregator", "build_pre_aggregator", "need"]


@dataclass(frozen=True)
class Bound:
    """What a binder knows: ``n`` rows in, ``f`` tolerated, ``tau``, checked params ``p``, params as given."""

    n: int
    f: int
    tau: float
    p: dict[str, Any]
    given: dict[str, Any]
    generator: torch.Generator | None


def need(ok: bool, field_path: str, msg: str) -> None:
    if not ok:
        raise ConfigError(field_path, msg)


def _half(name: str) -> Callable[[Bound], None]:
    return lambda b: need(b.n > 2 * b.f, "defense.f", f"{name} needs n > 2f (n={b.n}, f={b.f})")


def _as_config_error(check: Callable[[], Any], field_path: str) -> None:
    try:
        check()
    except ValueError as err:
        raise ConfigError(field_path, str(err)) from None


# ---- aggregators -------------------------------------------------------------------------------------

_EVEN = Param("even", Choice(A.MEDIAN_MODES), "average", "median of an even count: average, lower or upper")
_NEIGHBOURS = Param(
    "neighbours", Choice(A.KRUM_NEIGHBOURS), "blanchard", "neighbours per score: blanchard n-f-2, byzfl n-f-1"
)
_EIGEN = Param("eigen", Choice(A.EIGEN_MODES), "exact", "top eigenvalue: exact, or ByzFL's one power iteration")


def _krum_check(b: Bound) -> None:
    _as_config_error(lambda: A._krum_neighbours(b.n, b.f, b.p["neighbours"], "krum"), "defense.f")
    m = b.p.get("m")
    need(m is None or m <= b.n, "defense.params.m", f"multi_krum needs 1 <= m <= n (n={b.n}, m={m})")


def _subsets_check(name: str, power: int, budget: float) -> Callable[[Bound], None]:
    def check(b: Bound) -> None:
        _half(name)(b)
        _as_config_error(lambda: A._check_subsets(b.n, b.f, name, power, budget), "defense.f")

    return check


def _monna_check(b: Bound) -> None:
    _half("monna")(b)
    need(b.p["idx"] < b.n, "defense.params.idx", f"monna needs idx < n (n={b.n}, idx={b.p['idx']})")


def _dnc_check(b: Bound) -> None:
    keep = b.n - math.floor(b.p["filter_frac"] * b.f)
    need(keep >= 1, "defense.params.filter_frac", f"dnc needs n - floor(filter_frac * f) >= 1, got {keep}")


def _sign_guard_check(b: Bound) -> None:
    p = b.p
    need(p["low"] <= p["high"], "defense.params.low", f"must be <= high ({p['high']}), got {p['low']}")


def _cclip_check(b: Bound) -> None:
    tau = b.tau
    ok = isinstance(tau, numbers.Real) and not isinstance(tau, bool) and not math.isnan(tau) and tau > 0
    need(ok, "defense.tau", f"must be > 0, got {tau!r}")
    fixed = b.p["iters"] is not None and ("tol" in b.given or "max_iters" in b.given)
    need(not fixed, "defense.params.iters", "fixes the iteration count; do not combine it with tol or max_iters")


def _cclip_bind(b: Bound) -> BoundAggregator:
    p = b.p
    tol, max_iters = (0.0, p["iters"]) if p["iters"] is not None else (p["tol"], p["max_iters"])

    def run(x: torch.Tensor, start: torch.Tensor | None = None):
        return A.centered_clip(x, b.tau, start=start, tol=tol, max_iters=max_iters, median=p["median"], return_stats=True)

    return BoundAggregator("cclip_ps", b.n, run, with_stats=True, stateful=p["momentum"])


for _entry in (
    Entry("mean", "coordinate mean (no defense)", obj=lambda b: A.mean),
    Entry(
        "median", "coordinate median", obj=lambda b: lambda x: A.coordinate_median(x, even=b.p["even"]),
        params=(_EVEN,), variant="even n: average / lower / upper",
    ),
    Entry(
        "trimmed_mean", "per coordinate, the mean without the f lowest and f highest values",
        obj=lambda b: lambda x: A.trimmed_mean(x, b.f), check=_half("trimmed_mean"), preconditions="n > 2f",
        variant="ByzFL TrMean", reference="Yin et al. 2018",
    ),
    Entry(
        "krum", "the row with the smallest sum of squared distances to its nearest neighbours",
        obj=lambda b: lambda x: A.krum(x, b.f, neighbours=b.p["neighbours"]), params=(_NEIGHBOURS,),
        check=_krum_check, preconditions="n >= 2f+3 (byzfl: 2f+1)", variant="neighbours: blanchard or byzfl",
        reference="Blanchard et al. 2017",
    ),
    Entry(
        "multi_krum", "mean of the m rows with the best Krum scores",
        obj=lambda b: lambda x: A.multi_krum(x, b.f, b.p["m"], neighbours=b.p["neighbours"]),
        params=(_NEIGHBOURS, Param("m", Int(1), None, "rows averaged (null: n - f, as ByzFL)")),
        check=_krum_check, preconditions="as krum; m <= n", variant="m = n-f by default (ByzFL)",
        reference="Blanchard et al. 2017",
    ),
    Entry(
        "geometric_median", "geometric median by smoothed Weiszfeld iterations",
        obj=lambda b: lambda x: A.geometric_median(
            x, nu=b.p["nu"], tol=b.p["tol"], max_iters=b.p["max_iters"], return_stats=True
        ),
        params=(
            Param("nu", Real(0, open_low=True), 1e-6, "smoothing: distances below nu count as nu"),
            Param("tol", Real(0), 1e-6, "stop when the relative change is below tol"),
            Param("max_iters", Int(1), 1000, "iteration cap"),
        ),
        variant="smoothed Weiszfeld from the mean, relative stop", reference="Pillutla et al. 2022",
        extra={"stats": True},
    ),
    Entry(
        "cclip_ps", "CenteredClip on whole vectors, on a trusted parameter server (defense.tau)", obj=_cclip_bind,
        params=(
            Param("iters", Int(1), None, "run exactly this many iterations (excludes tol, max_iters)"),
            Param("momentum", BOOL, False, "start from the previous step's output (stateful)"),
            Param("tol", Real(0), 1e-6, "stop when the update is below tol (default: defense.cclip_tol)"),
            Param("max_iters", Int(1), 1000, "iteration cap (default: defense.cclip_max_iters)"),
            Param("median", Choice(A.MEDIAN_MODES), "lower", "start: the coordinate median, even n by this"),
        ),
        check=_cclip_check, preconditions="tau > 0", variant="start at the median, tolerance stop",
        reference="Karimireddy et al. 2021",
    ),
    Entry(
        "mda", "mean of the n-f rows of smallest diameter", obj=lambda b: lambda x: A.mda(x, b.f),
        check=_subsets_check("mda", 2, A.MDA_MAX_WORK),
        preconditions=f"n > 2f; C(n,f)(n-f)^2 <= {A.MDA_MAX_WORK:.0e} (about a minute)",
        variant="ByzFL MDA, exact; ties to the first subset", reference="El Mhamdi et al. 2020",
    ),
    Entry(
        "monna", "mean of the n-f rows nearest row idx (the row the server trusts)",
        obj=lambda b: lambda x: A.monna(x, b.f, idx=b.p["idx"]),
        params=(Param("idx", Int(0), 0, "the trusted row"),),
        check=_monna_check,
        preconditions="n > 2f; idx < n", variant="ByzFL MoNNA", reference="Farhadkhani et al. 2023",
    ),
    Entry(
        "meamed", "per coordinate, mean of the n-f values nearest the median",
        obj=lambda b: lambda x: A.meamed(x, b.f), check=_half("meamed"), preconditions="n > 2f",
        variant="ByzFL Meamed", reference="Xie et al. 2018",
    ),
    Entry(
        "caf", "covariance-bound filter: downweight along the top eigenvector until the spread is bounded",
        obj=lambda b: lambda x: A.caf(
            x, b.f, eigen=b.p["eigen"], generator=b.generator, tau_max_over=b.p["tau_max_over"]
        ),
        params=(_EIGEN, Param("tau_max_over", Choice(A.CAF_TAU_MAX), "weighted", "rows whose score sets the step: weighted or all (ByzFL)")),
        check=_half("caf"), preconditions="n > 2f; finite input", variant="exact eigenvalues by default",
        reference="Allouah, Guerraoui, Stephan 2025", extra={"random": lambda p: p["eigen"] == "power"},
    ),
    Entry(
        "smea", "mean of the n-f rows whose covariance has the smallest top eigenvalue",
        obj=lambda b: lambda x: A.smea(x, b.f, eigen=b.p["eigen"], generator=b.generator), params=(_EIGEN,),
        check=_subsets_check("smea", 3, A.SMEA_MAX_WORK),
        preconditions=f"n > 2f; C(n,f)(n-f)^3 <= {A.SMEA_MAX_WORK:.0e} (about a minute)",
        variant="exact eigenvalues by default", reference="Allouah et al. 2023",
        extra={"random": lambda p: p["eigen"] == "power"},
    ),
    Entry(
        "bulyan", "n-2f Krum picks, then per coordinate the mean of the n-4f values nearest the median",
        obj=lambda b: lambda x: A.bulyan(x, b.f),
        check=lambda b: need(b.n >= 4 * b.f + 3, "defense.f", f"bulyan needs n >= 4f + 3 (n={b.n}, f={b.f})"),
        preconditions="n >= 4f+3", variant="Krum over the remaining set", reference="El Mhamdi, Guerraoui, Rouault 2018",
    ),
    Entry(
        "dnc", "divide and conquer: drop rows far along the top singular vector of random coordinate subsets",
        obj=lambda b: lambda x: A.dnc(
            x, b.f, b.generator, sub_dim=b.p["sub_dim"], iters=b.p["iters"], filter_frac=b.p["filter_frac"]
        ),
        params=(
            Param("sub_dim", Int(1), 10_000, "coordinates sampled per round"),
            Param("iters", Int(1), 5, "rounds"),
            Param("filter_frac", Real(0), 1.0, "rows dropped per round: floor(filter_frac * f)"),
        ),
        check=_dnc_check, preconditions="n - floor(filter_frac f) >= 1; finite input", variant="Blades defaults",
        reference="Shejwalkar & Houmansadr 2021", extra={"random": lambda p: True},
    ),
    Entry(
        "sign_guard", "norm filter and sign-statistics clustering, then the mean of the kept rows clipped to the median norm",
        obj=lambda b: lambda x: A.sign_guard(
            x, b.generator, low=b.p["low"], high=b.p["high"], coord_frac=b.p["coord_frac"]
        ),
        params=(
            Param("low", Real(0), 0.1, "smallest kept ratio of a row's norm to the median norm"),
            Param("high", Real(0, open_low=True), 3.0, "largest kept ratio"),
            Param("coord_frac", Real(0, 1, open_low=True), 0.1, "share of coordinates for the sign statistics"),
        ),
        check=_sign_guard_check, preconditions="low <= high", variant="2-means instead of MeanShift",
        reference="Xu et al. 2022", extra={"random": lambda p: True},
    ),
    Entry(
        "clipped_clustering", "clip to the median norm, two clusters by cosine distance, mean of the larger",
        obj=lambda b: lambda x: A.clipped_clustering(x, max_tau=b.p["max_tau"]),
        params=(Param("max_tau", Real(0, open_low=True), 1e5, "cap on the clipping norm"),),
        preconditions="finite input", variant="median over this step's norms (stateless)",
        reference="Li et al. 2023 (Blades)",
    ),
):
    AGGREGATORS.add(_entry)


# ---- pre-aggregators ---------------------------------------------------------------------------------


def _f_below_n(name: str) -> Callable[[Bound], None]:
    return lambda b: need(b.n is None or b.f < b.n, "defense.f", f"{name} needs f < n (n={b.n}, f={b.f})")


for _entry in (
    Entry(
        "bucketing", "shuffle the rows, average buckets of bucket_size",
        obj=lambda b: lambda x: A.bucketing(x, b.p["bucket_size"], b.generator),
        params=(Param("bucket_size", Int(1), 2, "rows per bucket"),), reference="Karimireddy, He, Jaggi 2022",
        extra={"random": lambda p: True, "rows": lambda n, p: -(-n // p["bucket_size"])},
    ),
    Entry(
        "nnm", "each row becomes the mean of its n-f nearest rows", obj=lambda b: lambda x: A.nnm(x, b.f),
        check=_f_below_n("nnm"), preconditions="f < n", reference="Allouah et al. 2023",
    ),
    Entry(
        "arc", "clip the k = floor(2f(n-f)/n) largest-norm rows to the next largest norm",
        obj=lambda b: lambda x: A.arc(x, b.f), check=_f_below_n("arc"), preconditions="f < n",
        variant="ByzFL 0.0.11's threshold", reference="Allouah et al. 2024",
    ),
    Entry(
        "clipping", "rows with norm above c scaled to norm c", obj=lambda b: lambda x: A.static_clipping(x, b.p["c"]),
        params=(Param("c", Real(0), 2.0, "the norm bound (ByzFL's default)"),), reference="ByzFL Clipping",
    ),
):
    PRE_AGGREGATORS.add(_entry)


# ---- binding -----------------------------------------------------------------------------------------


class BoundAggregator:
    """An aggregation rule with its parameters bound, for exactly ``n`` input rows.

    Calling it with an (n, d) tensor returns the aggregate. ``last_stats`` holds the iterative rules'
    stats from the latest call (None for the others). Stateless unless built as ``cclip_ps`` with
    ``momentum=True``: then each call starts from the previous output (Karimireddy et al.'s
    momentum-style CenteredClip), so calls must come in step order and ``reset()`` forgets the state.
    """

    def __init__(self, name: str, n: int, fn: Callable[..., Any], *, with_stats: bool, stateful: bool = False):
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

    def carry_state(self, other: BoundAggregator) -> None:
        """Continue from ``other``'s previous output (the same rule rebound for another number of rows)."""
        self._prev = other._prev

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


class BoundPreAggregator:
    """A pre-aggregator with its parameters bound: (n, d) tensor -> (output_rows(n), d) tensor."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], rows: Callable[[int], int]):
        self.name = name
        self._fn = fn
        self._rows = rows

    def output_rows(self, n: int) -> int:
        """Rows produced from n input rows (what the following aggregator must be built for)."""
        return self._rows(n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def __repr__(self) -> str:
        return f"BoundPreAggregator({self.name!r})"


def _check_f(f: Any) -> None:
    ok = isinstance(f, numbers.Integral) and not isinstance(f, bool) and f >= 0
    need(ok, "defense.f", f"must be an int >= 0, got {f!r}")


def _bound(entry: Entry, n: Any, f: int, tau: float, params: dict | None, generator, shared: frozenset) -> Bound:
    p = entry.bind(params, "defense.params", shared)
    b = Bound(n, f, tau, p, dict(params or {}), generator)
    if entry.check is not None:
        entry.check(b)
    random = entry.extra.get("random")
    if random is not None and random(p) and not isinstance(generator, torch.Generator):
        raise ValueError(f"{entry.name} needs an explicit torch.Generator, got {type(generator).__name__}")
    return b


def build_aggregator(
    name: str, *, f: int, tau: float, params: dict | None, n: int, generator: torch.Generator | None = None
) -> BoundAggregator:
    """Bind ``defense.*`` settings to the rule ``name`` for inputs of ``n`` rows (after pre-aggregators).

    Checks the parameters and every precondition now, raising ConfigError naming ``defense.name``,
    ``defense.f``, ``defense.tau`` or ``defense.params.<key>``. One ``defense.params`` mapping feeds the
    rule and its pre-aggregators, so pre-aggregator keys are skipped here; any other unknown key is an error.
    ``generator`` (public, seeded from the run seed) feeds the randomised rules.
    """
    entry = AGGREGATORS.lookup(name)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"build_aggregator: n must be an int >= 1, got {n!r}")
    _check_f(f)
    b = _bound(entry, n, f, tau, params, generator, PRE_AGGREGATORS.param_names())
    fn = entry.obj(b)
    if isinstance(fn, BoundAggregator):
        return fn
    return BoundAggregator(name, n, fn, with_stats=bool(entry.extra.get("stats")))


def build_pre_aggregator(
    name: str, *, f: int, params: dict | None, generator: torch.Generator | None, n: int | None = None
) -> BoundPreAggregator:
    """Bind the pre-aggregator ``name``; with ``n`` (its input rows) its preconditions are checked now.

    Keys of any registered rule are skipped (one ``defense.params`` mapping feeds the whole pipeline); a key
    no rule knows is an error. Errors name ``defense.pre``, ``defense.f`` or ``defense.params.<key>``.
    """
    entry = PRE_AGGREGATORS.lookup(name)
    _check_f(f)
    shared = AGGREGATORS.param_names() | PRE_AGGREGATORS.param_names()
    b = _bound(entry, n, f, math.nan, params, generator, shared)
    rows = entry.extra.get("rows")
    return BoundPreAggregator(name, entry.obj(b), (lambda k: rows(k, b.p)) if rows else (lambda k: k))
