"""Tests for byztrain.aggregators: hand-computed golden values, properties, preconditions, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from byztrain import aggregators as A
from byztrain import rules as R
from byztrain.errors import ConfigError

PROPS = settings(max_examples=50, deadline=None)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# ---- strategies -------------------------------------------------------------------------------------


@st.composite
def matrices(draw, min_n=1, max_n=9, max_d=4, bound=100.0):
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    a = draw(arrays(np.float64, (n, d), elements=st.floats(-bound, bound, allow_nan=False)))
    return torch.from_numpy(a)


def jitter(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Generic inputs for Krum: hypothesis likes duplicates; a seeded perturbation breaks exact ties."""
    g = torch.Generator().manual_seed(seed)
    return x + 1e-3 * torch.randn(x.shape, generator=g, dtype=x.dtype)


def naive_krum_scores(x: torch.Tensor, k: int) -> list[float]:
    rows = x.tolist()
    scores = []
    for i, a in enumerate(rows):
        dists = sorted(
            sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) for j, b in enumerate(rows) if j != i
        )
        scores.append(sum(dists[:k]))
    return scores


# ---- golden values (hand-computed) -------------------------------------------------------------------

# Even n with a tie (column 1 has two 2s) and an outlier (10 in column 0):
#   col0 sorted 1, 2, 3, 10 -> lower 2, upper 3, average 2.5
#   col1 sorted 0, 2, 2, 5  -> lower 2, upper 2, average 2
EVEN = [[1.0, 5.0], [3.0, 2.0], [2.0, 2.0], [10.0, 0.0]]
# Odd n: EVEN plus [100, -1]: col0 1, 2, 3, 10, 100 -> 3; col1 -1, 0, 2, 2, 5 -> 2
ODD = EVEN + [[100.0, -1.0]]


@pytest.mark.parametrize(
    "even, expected", [("average", [2.5, 2.0]), ("lower", [2.0, 2.0]), ("upper", [3.0, 2.0])]
)
def test_median_even_modes(even, expected):
    assert torch.equal(A.coordinate_median(t(EVEN), even=even), t(expected))


@pytest.mark.parametrize("even", A.MEDIAN_MODES)
def test_median_odd_all_modes_agree(even):
    assert torch.equal(A.coordinate_median(t(ODD), even=even), t([3.0, 2.0]))


def test_median_default_is_average():
    assert torch.equal(A.coordinate_median(t(EVEN)), t([2.5, 2.0]))


def test_trimmed_mean_golden():
    # EVEN, f=1: col0 drop 1 and 10 -> (2+3)/2 = 2.5; col1 drop 0 and 5 -> (2+2)/2 = 2
    assert torch.allclose(A.trimmed_mean(t(EVEN), 1), t([2.5, 2.0]))
    # ODD, f=1: col0 drop 1, 100 -> (2+3+10)/3 = 5; col1 drop -1, 5 -> (0+2+2)/3 = 4/3
    assert torch.allclose(A.trimmed_mean(t(ODD), 1), t([5.0, 4.0 / 3.0]))
    # ODD, f=2 keeps only the middle value: the median
    assert torch.allclose(A.trimmed_mean(t(ODD), 2), t([3.0, 2.0]))


# 1-D points 0, 3, 4, 5, 9 (n=5, f=1). Squared distances to the others, sorted:
#   0: 9, 16, 25, 81    3: 1, 4, 9, 36    4: 1, 1, 16, 25    5: 1, 4, 16, 25    9: 16, 25, 36, 81
# blanchard k = n-f-2 = 2: scores 25, 5, 2, 5, 41   -> row 2 (value 4)
# byzfl     k = n-f-1 = 3: scores 50, 14, 18, 21, 77 -> row 1 (value 3)
KRUM_X = [[0.0], [3.0], [4.0], [5.0], [9.0]]


def test_krum_neighbour_rules_select_different_rows():
    assert torch.equal(A.krum(t(KRUM_X), 1), t([4.0]))
    assert torch.equal(A.krum(t(KRUM_X), 1, neighbours="blanchard"), t([4.0]))
    assert torch.equal(A.krum(t(KRUM_X), 1, neighbours="byzfl"), t([3.0]))


def test_krum_scores_match_hand_values():
    assert A._krum_scores(t(KRUM_X), 2).tolist() == [25.0, 5.0, 2.0, 5.0, 41.0]
    assert A._krum_scores(t(KRUM_X), 3).tolist() == [50.0, 14.0, 18.0, 21.0, 77.0]


def test_krum_tie_goes_to_lowest_index():
    # 0, 1, 3, 4 with f=0, k=2: scores 1+9=10, 1+4=5, 1+4=5, 1+9=10 -> rows 1 and 2 tie -> row 1
    assert torch.equal(A.krum(t([[0.0], [1.0], [3.0], [4.0]]), 0), t([1.0]))


def test_multi_krum_golden():
    x = t(KRUM_X)
    # default m = n - f = 4; blanchard order 2, 1, 3, 0 (1 and 3 tie at 5, lower index first)
    # -> mean(4, 3, 5, 0) = 3
    assert torch.allclose(A.multi_krum(x, 1), t([3.0]))
    # m = 2: rows 2 and 1 (the tie with row 3 goes to the lower index) -> (4 + 3) / 2 = 3.5
    assert torch.allclose(A.multi_krum(x, 1, 2), t([3.5]))
    # m = 3 byzfl: scores 50, 14, 18, 21, 77 -> rows 1, 2, 3 -> (3 + 4 + 5) / 3 = 4
    assert torch.allclose(A.multi_krum(x, 1, 3, neighbours="byzfl"), t([4.0]))
    # m = 1 is Krum
    assert torch.equal(A.multi_krum(x, 1, 1), A.krum(x, 1))


def test_geometric_median_diagonals_of_convex_quadrilateral():
    # A=(-1,0), C=(3,0), B=(0,-2), D=(0,1). For any z: |z-A|+|z-C| >= |A-C| with equality on segment AC,
    # likewise for BD; both segments contain (0,0), so it is the unique geometric median. The mean
    # (0.5, -0.25) is the start, so the iteration has work to do.
    x = t([[-1.0, 0.0], [3.0, 0.0], [0.0, -2.0], [0.0, 1.0]])
    gm, stats = A.geometric_median(x, tol=1e-12, return_stats=True)
    assert stats["converged"] and stats["iterations"] > 1
    assert torch.allclose(gm, t([0.0, 0.0]), atol=1e-9)


def test_geometric_median_collinear_is_median():
    # Points on a line: the geometric median is the 1-D median, here 2 (mean 22.6 is far away).
    x = t([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [100.0, 0.0]])
    assert torch.allclose(A.geometric_median(x, tol=1e-12), t([2.0, 0.0]), atol=1e-9)


def test_centered_clip_huge_tau_golden():
    # Lower-median start (0, 0); the first step is mean(x - 0) = (3, 3.5); the next step is 0.
    x = t([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [10.0, 10.0]])
    v, stats = A.centered_clip(x, 1e6, return_stats=True)
    assert torch.allclose(v, t([3.0, 3.5]))
    assert stats["iterations"] == 2 and stats["clipped"] == 0 and stats["converged"]


def test_centered_clip_small_tau_with_outlier_1d():
    # x = 0, 0, 0, 100 and tau = 1, start = lower median 0. While 0 <= v < 1 the honest rows are inside
    # the radius and the outlier is clipped to +1: v <- v + (-3v + 1)/4 = 1/4 + v/4.
    # v1 = 0.25, v2 = 0.3125, fixed point 3v = 1 -> v = 1/3.
    x = t([[0.0], [0.0], [0.0], [100.0]])
    assert torch.allclose(A.centered_clip(x, 1.0, max_iters=1), t([0.25]))
    assert torch.allclose(A.centered_clip(x, 1.0, max_iters=2), t([0.3125]))
    v, stats = A.centered_clip(x, 1.0, tol=1e-12, return_stats=True)
    assert torch.allclose(v, t([1.0 / 3.0]), atol=1e-10)
    assert stats["clipped"] == 1 and stats["converged"]


def test_centered_clip_small_tau_with_outlier_2d():
    # Three rows at 0 and one at (30, 40) (distance 50), tau = 5. By symmetry v = s (0.6, 0.8) with
    # s < 5 (honest rows unclipped, outlier clipped to length 5): -3s + 5 = 0 -> s = 5/3 -> v = (1, 4/3).
    x = t([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [30.0, 40.0]])
    v = A.centered_clip(x, 5.0, tol=1e-12)
    assert torch.allclose(v, t([1.0, 4.0 / 3.0]), atol=1e-10)


def test_centered_clip_start_modes():
    # x = 0, 0, 2, 100: lower median 0, upper median 2. One step with tau = 1:
    #   lower: diffs 0, 0, 2, 100 -> clipped 0, 0, 1, 1 -> v = 0 + 2/4 = 0.5
    #   upper: diffs -2, -2, 0, 98 -> clipped -1, -1, 0, 1 -> v = 2 - 1/4 = 1.75
    #   start 10: diffs -10, -10, -8, 90 -> clipped -1, -1, -1, 1 -> v = 10 - 2/4 = 9.5
    x = t([[0.0], [0.0], [2.0], [100.0]])
    assert torch.allclose(A.centered_clip(x, 1.0, max_iters=1, median="lower"), t([0.5]))
    assert torch.allclose(A.centered_clip(x, 1.0, max_iters=1, median="upper"), t([1.75]))
    assert torch.allclose(A.centered_clip(x, 1.0, max_iters=1, start=t([10.0])), t([9.5]))


def test_nnm_golden():
    # 1-D 0, 1, 3, 10 with f=1: each row -> mean of its 3 nearest (itself included):
    #   0 -> {0, 1, 3} = 4/3; 1 -> {1, 0, 3} = 4/3; 3 -> {3, 1, 0} = 4/3; 10 -> {10, 3, 1} = 14/3
    out = A.nnm(t([[0.0], [1.0], [3.0], [10.0]]), 1)
    assert torch.allclose(out, t([[4 / 3], [4 / 3], [4 / 3], [14 / 3]]))
    # Self comes first even against an exact duplicate; f = n - 1 keeps every row as is.
    x = t([[0.0], [0.0], [5.0]])
    assert torch.equal(A.nnm(x, 2), x)


def test_bucketing_golden_and_generator():
    x = t([[0.0], [1.0], [2.0], [3.0], [4.0]])
    g = torch.Generator().manual_seed(3)
    p = torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    # x[i] = i, so with s = 2 the buckets are (p0, p1), (p2, p3) and the remainder (p4) alone
    expected = t([[(p[0] + p[1]) / 2], [(p[2] + p[3]) / 2], [p[4]]])
    state = torch.get_rng_state()
    out = A.bucketing(x, 2, g)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.allclose(out, expected)
    # Same seed, same output; s >= n is one bucket (the mean); s = 1 is a permutation.
    assert torch.equal(A.bucketing(x, 2, torch.Generator().manual_seed(3)), out)
    assert torch.allclose(A.bucketing(x, 7, g), t([[2.0]]))
    assert torch.equal(A.bucketing(x, 1, g).sort(dim=0).values, x)


# ---- properties -------------------------------------------------------------------------------------


def all_rules(n: int, f: int):
    """(name, fn) for every rule applicable to n rows with f declared Byzantine."""
    rules = [
        ("mean", A.mean),
        ("median-average", lambda x: A.coordinate_median(x, even="average")),
        ("median-lower", lambda x: A.coordinate_median(x, even="lower")),
        ("median-upper", lambda x: A.coordinate_median(x, even="upper")),
        ("geometric_median", lambda x: A.geometric_median(x, tol=1e-10)),
        ("centered_clip", lambda x: A.centered_clip(x, 5.0, tol=1e-10)),
    ]
    if n > 2 * f:
        rules.append(("trimmed_mean", lambda x: A.trimmed_mean(x, f)))
        rules.append(("krum-byzfl", lambda x: A.krum(x, f, neighbours="byzfl")))
    if n >= 2 * f + 3:
        rules.append(("krum", lambda x: A.krum(x, f)))
        rules.append(("multi_krum", lambda x: A.multi_krum(x, f)))
    return rules


@PROPS
@given(x=matrices(min_n=3), data=st.data())
def test_permutation_invariance(x, data):
    n = x.shape[0]
    f = data.draw(st.integers(0, (n - 1) // 2))
    x = jitter(x, data.draw(st.integers(0, 2**16)))
    perm = torch.tensor(data.draw(st.permutations(list(range(n)))))
    # Krum picks one row: exclude near-ties in the best score, where rounding may swap rows.
    for k in [n - f - 1] + ([n - f - 2] if n >= 2 * f + 3 else []):
        s = sorted(naive_krum_scores(x, k))
        assume(s[1] - s[0] > 1e-9 * (1 + s[0]))
    scale = 1 + float(x.abs().max())
    for name, fn in all_rules(n, f):
        a, b = fn(x), fn(x[perm])
        assert torch.allclose(a, b, rtol=0, atol=1e-7 * scale), name


@PROPS
@given(x=matrices(min_n=3), data=st.data())
def test_krum_matches_naive_reference(x, data):
    n = x.shape[0]
    f = data.draw(st.integers(0, (n - 1) // 2))
    x = jitter(x, data.draw(st.integers(0, 2**16)))
    for neighbours, k in (("byzfl", n - f - 1), ("blanchard", n - f - 2)):
        if k < 1 or n < 2 * f + (3 if neighbours == "blanchard" else 1):
            continue
        scores = naive_krum_scores(x, k)
        assert np.allclose(A._krum_scores(x, k).numpy(), scores, rtol=1e-9, atol=1e-9)
        best = sorted(scores)
        if best[1] - best[0] > 1e-9 * (1 + best[0]):
            assert torch.equal(A.krum(x, f, neighbours=neighbours), x[int(np.argmin(scores))])


@PROPS
@given(x=matrices())
def test_trimmed_mean_f0_is_mean(x):
    assert torch.allclose(A.trimmed_mean(x, 0), A.mean(x))


@st.composite
def honest_plus_huge(draw):
    """Honest rows in [-10, 10], then b rows of +-1e9 entries; returns (x, honest, b, f)."""
    f = draw(st.integers(0, 3))
    n = draw(st.integers(2 * f + 3, 2 * f + 6))
    d = draw(st.integers(1, 3))
    b = draw(st.integers(0, f))
    honest = torch.from_numpy(draw(arrays(np.float64, (n - b, d), elements=st.floats(-10, 10))))
    signs = draw(arrays(np.float64, (b, d), elements=st.sampled_from([-1.0, 1.0])))
    x = torch.cat([honest, 1e9 * torch.from_numpy(signs)])
    perm = torch.tensor(draw(st.permutations(list(range(n)))))
    return x[perm], honest, b, f


@PROPS
@given(case=honest_plus_huge())
def test_robust_rules_stay_in_honest_bounding_box(case):
    x, honest, b, f = case
    lo, hi = honest.min(dim=0).values, honest.max(dim=0).values
    slack = 1e-12 * (1 + hi.abs().max())
    outputs = {
        "median": A.coordinate_median(x),  # b <= f < n/2
        "median-lower": A.coordinate_median(x, even="lower"),
        "median-upper": A.coordinate_median(x, even="upper"),
        "trimmed_mean": A.trimmed_mean(x, f),
        "krum": A.krum(x, f),  # returns a row: an honest one, since the huge rows score ~1e18
        "krum-byzfl": A.krum(x, f, neighbours="byzfl"),
    }
    for name, out in outputs.items():
        assert bool(((out >= lo - slack) & (out <= hi + slack)).all()), name


@PROPS
@given(case=honest_plus_huge())
def test_geometric_median_breakdown_bound(case):
    # The geometric median need not lie in the honest bounding box (3 collinear honest points and 2 far
    # outliers orthogonal to the line pull it off the line). What holds (Minsker 2015, Lemma 2.1): if all
    # but alpha*n points lie within r of z, alpha < 1/2, then |GM - z| <= (1 - alpha)/sqrt(1 - 2 alpha) r.
    x, honest, b, _ = case
    n = x.shape[0]
    z = honest.mean(dim=0)
    r = float(torch.linalg.vector_norm(honest - z, dim=1).max())
    alpha = b / n
    bound = (1 - alpha) / math.sqrt(1 - 2 * alpha) * r
    gm = A.geometric_median(x, tol=1e-10)
    assert float(torch.linalg.vector_norm(gm - z)) <= bound + 1e-4 * (1 + r)
    if x.shape[1] == 1:  # in 1-D the geometric median is a median: inside the honest range
        assert honest.min() - 1e-6 <= gm <= honest.max() + 1e-6


def test_geometric_median_can_leave_honest_box():
    # The counterexample behind the bound above: honest (-1,0), (0,0), (1,0); outliers far along +y.
    # At z = (0, y) the y-forces balance when 1 + 2y/sqrt(1+y^2) = 2, i.e. y = 1/sqrt(3).
    x = t([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1e9], [0.0, 1e9]])
    gm = A.geometric_median(x, tol=1e-12)
    assert torch.allclose(gm, t([0.0, 1 / math.sqrt(3)]), atol=1e-6)


def _gm_cases():
    """(name, x) inputs on which Weiszfeld runs past its explicit phase into the Gram phase."""
    g = torch.Generator().manual_seed(3)
    honest = 0.05 + 0.3 * torch.randn(9, 2000, generator=g)
    alie = honest.mean(0) - 1.15 * honest.std(0)  # 7 identical rows just inside the honest spread
    yield "alie", torch.cat([honest, alie.expand(7, -1)])
    yield "alie and far outliers", torch.cat([honest, alie.expand(5, -1), torch.full((2, 2000), 1e30)])
    yield "outliers at 1e30", torch.cat([honest, torch.full((7, 2000), 1e30)])
    yield "outliers at -3e38", torch.cat([honest, torch.full((7, 2000), -3e38)])


@pytest.mark.parametrize("name,x", list(_gm_cases()), ids=[c[0] for c in _gm_cases()])
def test_geometric_median_gram_phase_matches_explicit_iterations(name, x, monkeypatch):
    # The attacker's lever on the Gram phase is rounding: far rows make the Gram entries huge next to
    # the honest distances. Every case must land where the same iterations on
    # explicit float64 differences land, within the stopping rule's own slack.
    frames, real_frame = [], A._GramFrame
    monkeypatch.setattr(A, "_GramFrame", lambda *a: frames.append(1) or real_frame(*a))
    gm, stats = A.geometric_median(x, return_stats=True)
    assert frames and stats["converged"] and stats["iterations"] > A._WEISZFELD_EXPLICIT_ITERS
    monkeypatch.setattr(A, "_WEISZFELD_EXPLICIT_ITERS", 10**9)
    ref, ref_stats = A.geometric_median(x.double(), return_stats=True)
    scale = float(torch.linalg.vector_norm(ref)) + float(torch.linalg.vector_norm(x[:9].double() - ref, dim=1).mean())
    assert float(torch.linalg.vector_norm(gm.double() - ref)) <= 1e-5 * scale, name
    assert abs(stats["iterations"] - ref_stats["iterations"]) <= 0.05 * ref_stats["iterations"] + 5


def test_geometric_median_gram_phase_hands_back_when_rounding_is_too_coarse(monkeypatch):
    # tol = 0 in float64 asks for more than the Gram matrix can resolve: the iterations go back to
    # explicit differences and the result is bit-for-bit the all-explicit one.
    x, = [x for name, x in _gm_cases() if name == "alie"]
    x = x.double()
    gm, stats = A.geometric_median(x, tol=0.0, max_iters=300, return_stats=True)
    monkeypatch.setattr(A, "_WEISZFELD_EXPLICIT_ITERS", 10**9)
    ref, ref_stats = A.geometric_median(x, tol=0.0, max_iters=300, return_stats=True)
    assert torch.equal(gm, ref) and stats["iterations"] == ref_stats["iterations"] == 300


@pytest.mark.parametrize("value", [3e38, -3.4e38, 5e37])
def test_geometric_median_survives_rows_whose_sum_overflows(value):
    # 7 of 16 float32 rows at a huge finite value: their sum overflows float32, so a float32 mean start
    # was inf and every iterate NaN. The breakdown point is 1/2, so the median stays with the 9.
    g = torch.Generator().manual_seed(0)
    honest = 0.3 * torch.randn(9, 100, generator=g)
    gm = A.geometric_median(torch.cat([honest, torch.full((7, 100), value)]))
    r = float(torch.linalg.vector_norm(honest - honest.mean(0), dim=1).max())
    assert torch.isfinite(gm).all()
    assert float(torch.linalg.vector_norm(gm - honest.mean(0))) <= (9 / 16) / math.sqrt(2 / 16) * r


@pytest.mark.parametrize("value", [3e38, -3e38])
def test_every_rule_survives_rows_at_the_float32_limit(value):
    # f = 3 of 16 float32 rows at the largest finite value: any sum of two overflows. Every rule but the
    # mean must answer with a finite vector near the honest rows (measured: within 0.67 of their radius).
    g = torch.Generator().manual_seed(0)
    honest = 0.3 * torch.randn(13, 50, generator=g)
    x = torch.cat([honest, torch.full((3, 50), value)])
    radius = float(torch.linalg.vector_norm(honest - honest.mean(0), dim=1).max())
    for name in R.AGGREGATORS:
        if name == "mean":
            continue
        try:
            rule = R.build_aggregator(name, f=3, tau=1.0, params=None, n=16, generator=torch.Generator().manual_seed(1))
        except ConfigError:  # a precondition n = 16, f = 3 breaks
            continue
        out = rule(x)
        assert torch.isfinite(out).all(), name
        assert float(torch.linalg.vector_norm(out - honest.mean(0))) <= radius, name


def pre_and_agg_rules(n: int, f: int):
    g = torch.Generator().manual_seed(0)
    return all_rules(n, f) + [
        ("bucketing", lambda x: A.bucketing(x, 2, g)),
        ("nnm", lambda x: A.nnm(x, f)),
        ("centered_clip_batched", lambda x: A.centered_clip_batched(x[None], 1.0)[0][0]),
    ]


@PROPS
@given(x=matrices(min_n=3, max_n=7), data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_inputs_unchanged_and_dtype_kept(x, data, dtype):
    x = x.to(dtype)
    n = x.shape[0]
    f = data.draw(st.integers(0, (n - 1) // 2))
    for name, fn in pre_and_agg_rules(n, f):
        before = x.clone()
        out = fn(x)
        assert torch.equal(x, before), name
        assert out.dtype == dtype and out.device == x.device, name
        assert out.shape[-1] == x.shape[1], name
        if name not in ("bucketing", "nnm"):
            assert out.shape == (x.shape[1],), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype_preserved(device, dtype):
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    for name, fn in pre_and_agg_rules(7, 2):
        out = fn(x)
        assert out.device == x.device and out.dtype == dtype, name
    v, stats = A.centered_clip_batched(x.reshape(1, 7, 5), 1.0)
    assert v.device == x.device and stats["iterations"].device == x.device


# ---- CenteredClip properties -------------------------------------------------------------------------


@PROPS
@given(x=matrices(min_n=2, max_n=8, max_d=5, bound=10.0), tau=st.floats(0.5, 50.0))
def test_centered_clip_fixed_point(x, tau):
    tol = 1e-10
    v, stats = A.centered_clip(x, tau, tol=tol, max_iters=100_000, return_stats=True)
    assert stats["converged"]
    res = float(torch.linalg.vector_norm(A.fixed_point_residual(x, v, tau)))
    dist = torch.linalg.vector_norm(x - v, dim=1)
    total = float(dist.clamp(max=tau).sum())  # sum_i |min(1, tau/|x_i - v|)(x_i - v)|
    n = x.shape[0]
    # The CenteredClip map is nonexpansive, so |residual| = n |next step| <= n tol (|v| + tau).
    assert res <= n * tol * (float(torch.linalg.vector_norm(v)) + tau) * (1 + 1e-6) + 1e-12
    assert res <= 1e-6 * total + 1e-9
    assert stats["clipped"] == int((dist > tau).sum())


@PROPS
@given(x=matrices(min_n=1, max_n=8, bound=100.0))
def test_centered_clip_huge_tau_is_mean_property(x):
    assert torch.allclose(A.centered_clip(x, 1e12), A.mean(x), rtol=1e-12, atol=1e-10)
    assert torch.allclose(A.centered_clip(x, math.inf), A.mean(x), rtol=1e-12, atol=1e-10)


@PROPS
@given(
    x=matrices(min_n=2, max_n=8, bound=10.0),
    start=arrays(np.float64, 4, elements=st.floats(-10, 10)),
    tau=st.floats(0.1, 10.0),
    big=st.sampled_from([1e3, -1e6, 1e12]),
)
def test_centered_clip_outlier_moves_iterate_at_most_tau_over_n(x, start, tau, big):
    n, d = x.shape
    v0 = torch.from_numpy(start[:d])
    attacked = torch.cat([x[1:], torch.full((1, d), big, dtype=x.dtype)])
    neutral = torch.cat([x[1:], v0[None]])  # an outlier at the start contributes nothing
    a = A.centered_clip(attacked, tau, start=v0, max_iters=1, tol=0.0)
    b = A.centered_clip(neutral, tau, start=v0, max_iters=1, tol=0.0)
    assert float(torch.linalg.vector_norm(a - b)) <= tau / n * (1 + 1e-9) + 1e-12


@PROPS
@given(
    P=st.integers(1, 5),
    n=st.integers(2, 7),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    median=st.sampled_from(["lower", "upper"]),
)
def test_centered_clip_batched_matches_unbatched(P, n, k, seed, median):
    g = torch.Generator().manual_seed(seed)
    # Different scales per partition so the partitions converge after different iteration counts.
    scales = torch.logspace(-1, 0.5, P, dtype=torch.float32)[:, None, None]
    parts = torch.randn(P, n, k, generator=g) * scales
    parts[:, 0] += 50.0 * scales[:, 0]  # one outlier per partition
    tau = 1.0
    out, stats = A.centered_clip_batched(parts, tau, tol=1e-6, max_iters=1000, median=median)
    assert out.shape == (P, k) and out.dtype == torch.float32
    for p in range(P):
        v, s = A.centered_clip(parts[p], tau, tol=1e-6, max_iters=1000, median=median, return_stats=True)
        assert torch.allclose(out[p], v, rtol=1e-5, atol=1e-6 * float(scales[p])), p
        assert abs(int(stats["iterations"][p]) - s["iterations"]) <= 1
        assert int(stats["clipped"][p]) == s["clipped"]
        assert bool(stats["converged"][p]) == s["converged"]


def test_centered_clip_batched_converged_partition_stops():
    # Partition 0 (spread ~0.5, tau = 1) converges in a few iterations, partition 1 (spread ~10, all rows
    # clipped) needs hundreds. Partition 0 must stop changing once converged: its result is bitwise the
    # unbatched one (further tiny steps would change the low bits).
    g = torch.Generator().manual_seed(0)
    parts = torch.stack([0.5 * torch.randn(7, 3, generator=g), 10.0 * torch.randn(7, 3, generator=g)])
    out, stats = A.centered_clip_batched(parts, 1.0)
    assert int(stats["iterations"][1]) > int(stats["iterations"][0]) + 10
    for p in range(2):
        v, s = A.centered_clip(parts[p], 1.0, return_stats=True)
        assert torch.equal(out[p], v) and int(stats["iterations"][p]) == s["iterations"]
    assert bool(stats["converged"].all())


def test_centered_clip_zero_distance_and_identical_rows():
    x = t([[1.0, 2.0]] * 4)
    v, stats = A.centered_clip(x, 0.5, return_stats=True)
    assert torch.equal(v, t([1.0, 2.0])) and stats["iterations"] == 1 and stats["converged"]


def test_centered_clip_relative_rule_converges_at_large_scale():
    # An absolute 1e-6 rule cannot be met in float32 at scale 1e6; the relative rule can.
    g = torch.Generator().manual_seed(1)
    x = 1e6 * torch.randn(16, 1000, generator=g)
    _, stats = A.centered_clip(x, 1e6, return_stats=True)
    assert stats["converged"] and stats["iterations"] < 1000


def test_non_finite_inputs():
    x = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [math.inf, 0.0], [0.0, 0.0]], torch.float32)
    v, stats = A.centered_clip(x, 0.5, return_stats=True)
    assert torch.isfinite(v).all() and stats["clipped"] >= 1
    gm, gstats = A.geometric_median(x, return_stats=True)
    assert torch.isfinite(gm).all() and gstats["dropped"] == 1
    assert torch.isfinite(A.krum(x, 1)).all()
    assert torch.equal(A.coordinate_median(x, even="lower"), t([0.0, 0.0], torch.float32))
    # Finite but overflowing in float32: the norm falls back to float64, the row is still clipped.
    y = t([[0.0], [0.0], [3e38]], torch.float32)
    assert torch.isfinite(A.centered_clip(y, 1.0)).all()
    with pytest.raises(ValueError, match="NaN"):
        A.mean(t([[0.0], [math.nan]]))


# ---- preconditions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: A.krum(x[:5], 2), r"krum needs n >= 2f \+ 3 \(n=5, f=2\)"),
        (lambda x: A.multi_krum(x[:4], 1), r"multi_krum needs n >= 2f \+ 3 \(n=4, f=1\)"),
        (lambda x: A.krum(x[:4], 2, neighbours="byzfl"), r"n >= 2f \+ 1"),
        (lambda x: A.krum(x, 1, neighbours="paper"), "neighbours must be one of"),
        (lambda x: A.multi_krum(x, 1, m=9), "m <= n"),
        (lambda x: A.multi_krum(x, 1, m=0), "m must be >= 1"),
        (lambda x: A.trimmed_mean(x[:4], 2), r"trimmed_mean needs n > 2f \(n=4, f=2\)"),
        (lambda x: A.trimmed_mean(x, -1), "f must be >= 0"),
        (lambda x: A.krum(x, -1), "f must be >= 0"),
        (lambda x: A.nnm(x, -1), "f must be >= 0"),
        (lambda x: A.nnm(x, 7), r"nnm needs f < n"),
        (lambda x: A.trimmed_mean(x, 1.5), "f must be an int"),
        (lambda x: A.centered_clip(x, 0.0), "tau must be > 0"),
        (lambda x: A.centered_clip(x, -1.0), "tau must be > 0"),
        (lambda x: A.centered_clip(x, math.nan), "tau must be > 0"),
        (lambda x: A.centered_clip_batched(x[None], 0.0), "tau must be > 0"),
        (lambda x: A.centered_clip(x, 1.0, max_iters=0), "max_iters must be >= 1"),
        (lambda x: A.centered_clip(x, 1.0, median="middle"), "median must be one of"),
        (lambda x: A.centered_clip(x, 1.0, start=torch.zeros(3)), r"start must have shape \(2,\)"),
        (lambda x: A.centered_clip_batched(x, 1.0), "parts must be a 3-D tensor"),
        (lambda x: A.coordinate_median(x, even="mean"), "even must be one of"),
        (lambda x: A.geometric_median(x, nu=0.0), "nu must be > 0"),
        (lambda x: A.bucketing(x, 0, torch.Generator()), "s must be >= 1"),
        (lambda x: A.bucketing(x, 2, None), "generator must be a torch.Generator"),
        (lambda x: A.mean(x.long()), "floating-point"),
        (lambda x: A.mean(x[0]), r"2-D tensor \(n, d\)"),
        (lambda x: A.mean(x.numpy()), "torch.Tensor"),
        (lambda x: A.mean(x[:0]), "non-empty"),
    ],
)
def test_precondition_errors(call, match):
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        call(x)


# ---- registry -----------------------------------------------------------------------------------------


BASE_RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "cclip_ps")
# the ByzFL / Blades rules: tests/test_aggregators_extra.py
EXTRA_RULES = ("mda", "monna", "meamed", "caf", "smea", "bulyan", "dnc", "sign_guard", "clipped_clustering")


def test_registry_names():
    assert set(R.AGGREGATORS) == set(BASE_RULES + EXTRA_RULES)
    assert set(R.PRE_AGGREGATORS) == {"bucketing", "nnm", "arc", "clipping"}


@pytest.mark.parametrize("name", BASE_RULES)
def test_build_aggregator_matches_function(name):
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    agg = R.build_aggregator(name, f=2, tau=1.0, params={}, n=9)
    expected = {
        "mean": lambda: A.mean(x),
        "median": lambda: A.coordinate_median(x),
        "trimmed_mean": lambda: A.trimmed_mean(x, 2),
        "krum": lambda: A.krum(x, 2),
        "multi_krum": lambda: A.multi_krum(x, 2),
        "geometric_median": lambda: A.geometric_median(x),
        "cclip_ps": lambda: A.centered_clip(x, 1.0),
    }[name]()
    assert torch.equal(agg(x), expected)
    with pytest.raises(ValueError, match="built for n=9"):
        agg(x[:8])


def test_build_aggregator_params_bound():
    x = t(EVEN)
    assert torch.equal(
        R.build_aggregator("median", f=0, tau=1.0, params={"even": "upper"}, n=4)(x), t([3.0, 2.0])
    )
    agg = R.build_aggregator("krum", f=1, tau=1.0, params={"neighbours": "byzfl"}, n=5)
    assert torch.equal(agg(t(KRUM_X)), t([3.0]))
    gm = R.build_aggregator("geometric_median", f=0, tau=1.0, params={"max_iters": 2}, n=4)
    gm(x)
    assert gm.last_stats["iterations"] <= 2


def test_cclip_ps_iters_and_momentum():
    x = t([[0.0], [0.0], [0.0], [100.0]])
    fixed = R.build_aggregator("cclip_ps", f=1, tau=1.0, params={"iters": 2}, n=4)
    assert torch.allclose(fixed(x), t([0.3125]))  # see test_centered_clip_small_tau_with_outlier_1d
    assert fixed.last_stats["iterations"] == 2 and not fixed.stateful
    mom = R.build_aggregator("cclip_ps", f=1, tau=1.0, params={"iters": 1, "momentum": True}, n=4)
    first = mom(x)  # from the median 0: 0.25
    second = mom(x)  # from 0.25: 0.25 + (1 - 0.75)/4 = 0.3125
    assert torch.allclose(first, t([0.25])) and torch.allclose(second, t([0.3125]))
    first.add_(100.0)  # the caller's tensor is not the stored state
    assert torch.allclose(mom(x), t([0.25 + 0.25 * 0.3125]))
    mom.reset()
    assert torch.allclose(mom(x), t([0.25]))


@pytest.mark.parametrize(
    "kwargs, field, match",
    [
        (dict(name="krumm"), "defense.name", "did you mean 'krum'"),
        (dict(name="krum", f=2, n=5), "defense.f", r"krum needs n >= 2f \+ 3 \(n=5, f=2\)"),
        (dict(name="multi_krum", f=1, n=5, params={"m": 6}), "defense.params.m", "m <= n"),
        (dict(name="trimmed_mean", f=2, n=4), "defense.f", r"n > 2f"),
        (dict(name="mean", f=-1), "defense.f", ">= 0"),
        (dict(name="cclip_ps", tau=0.0), "defense.tau", "> 0"),
        (dict(name="cclip_ps", params={"iter": 3}), "defense.params.iter", "did you mean 'iters'"),
        (dict(name="cclip_ps", params={"iters": 3, "tol": 1e-3}), "defense.params.iters", "do not combine"),
        (dict(name="cclip_ps", params={"momentum": 1}), "defense.params.momentum", "true or false"),
        (dict(name="median", params={"even": "mid"}), "defense.params.even", "must be one of"),
        (dict(name="geometric_median", params={"tol": -1.0}), "defense.params.tol", ">= 0"),
        (dict(name="mean", params={"x": 1}), "defense.params.x", "accepted: none"),
        (dict(name="cclip_ps", params={"nu": 1e-3}), "defense.params.nu", "unknown parameter for 'cclip_ps'"),
    ],
)
def test_build_aggregator_errors(kwargs, field, match):
    args = dict(f=1, tau=1.0, params={}, n=9) | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=match) as info:
        R.build_aggregator(name, **args)
    assert info.value.field == field
    assert field in str(info.value)


def test_build_pre_aggregator():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    b = R.build_pre_aggregator("bucketing", f=1, params={}, generator=g)
    assert b.output_rows(7) == 4 and b(x).shape == (4, 3)  # default bucket_size 2
    b3 = R.build_pre_aggregator("bucketing", f=1, params={"bucket_size": 3}, generator=g)
    assert b3.output_rows(7) == 3
    m = R.build_pre_aggregator("nnm", f=2, params={}, generator=None, n=7)
    assert torch.equal(m(x), A.nnm(x, 2)) and m.output_rows(7) == 7
    with pytest.raises(ValueError, match="did you mean 'nnm'") as info:
        R.build_pre_aggregator("nmm", f=1, params={}, generator=g)
    assert info.value.field == "defense.pre"
    with pytest.raises(ValueError, match="torch.Generator"):
        R.build_pre_aggregator("bucketing", f=1, params={}, generator=None)
    with pytest.raises(ValueError, match="defense.params.bucket_size"):
        R.build_pre_aggregator("bucketing", f=1, params={"bucket_size": 0}, generator=g)
    with pytest.raises(ValueError, match="nnm needs f < n"):
        R.build_pre_aggregator("nnm", f=7, params={}, generator=None, n=7)


def test_shared_params_mapping():
    # One defense.params mapping feeds the pre-aggregators and the rule: each skips the other's keys.
    params = {"bucket_size": 3, "neighbours": "byzfl"}
    pre = R.build_pre_aggregator("bucketing", f=1, params=params, generator=torch.Generator())
    agg = R.build_aggregator("krum", f=1, tau=1.0, params=params, n=pre.output_rows(10))
    assert agg(pre(torch.randn(10, 3))).shape == (3,)
    with pytest.raises(ValueError, match="did you mean 'bucket_size'") as info:
        R.build_pre_aggregator("bucketing", f=1, params={"bucketsize": 3}, generator=torch.Generator())
    assert info.value.field == "defense.params.bucketsize"


# ---- BTARD's CenteredClip: the reweighted solver -------------------------------------------------------


@pytest.mark.parametrize("tau", [0.01, 1.0, 1000.0])
def test_irls_centered_clip_reaches_the_fixed_point_its_stopping_rule_measures(tau):
    """The published iterate satisfies ||r(v)|| <= tol * sum_i min(d_i, tau), recomputed here in float64,
    in a few iterations even when tau is far below the rows' spread (all rows clipped)."""
    g = torch.Generator().manual_seed(3)
    parts = torch.randn(3, 9, 400, generator=g) + 5 * torch.randn(3, 1, 400, generator=g)
    parts[:, :2] += 40.0  # two outlying rows
    before = parts.clone()
    out, stats = A.centered_clip_irls_batched(parts, tau, tol=1e-6)
    assert torch.equal(parts, before)  # input untouched
    assert stats["converged"].all() and int(stats["iterations"].max()) <= 50
    r = A.fixed_point_residual(parts, out, tau)
    mass = (parts.double() - out.double()[:, None]).norm(dim=2).clamp(max=tau).sum(dim=1)
    assert (r.norm(dim=1) <= 2e-6 * mass).all()  # the rule's tol, plus float32 evaluation error
    same, _ = A.centered_clip(parts[1], tau, tol=1e-9, max_iters=100_000, return_stats=True)
    assert torch.allclose(out[1], same, atol=1e-4 * float(same.norm()) + 1e-6)  # the same fixed point


def test_irls_centered_clip_of_a_partition_does_not_depend_on_the_batch():
    """A dispute reruns one partition on its own: the result must be the aggregator's, bit for bit, even
    when the batch held a partition of a very different scale (the float32/float64 norm choice is per
    partition)."""
    g = torch.Generator().manual_seed(4)
    parts = torch.randn(3, 7, 300, generator=g)
    parts[2] *= 1e17  # this partition needs float64 norms
    out, _ = A.centered_clip_irls_batched(parts, 0.5)
    for p in range(3):
        alone, _ = A.centered_clip_irls_batched(parts[p : p + 1].clone(), 0.5)
        assert torch.equal(alone[0], out[p])


def test_irls_centered_clip_preconditions():
    x = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="tau must be finite"):
        A.centered_clip_irls_batched(x, float("inf"))
    bad = x.clone()
    bad[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        A.centered_clip_irls_batched(bad, 1.0)
    with pytest.raises(ValueError, match="3-D"):
        A.centered_clip_irls_batched(x[0], 1.0)
