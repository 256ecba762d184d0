"""Order statistics through sorting networks (order_stats.py) against torch.sort / torch.median."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from byztrain import order_stats

PATHS = {"network": 0, "torch": 10**9}  # NETWORK_MIN_SLICE_PER_INPUT forcing one path or the other


def _both_paths(fn):
    """fn() once through the sorting network and once through torch's sort/kthvalue; the two must agree
    bit for bit (min/max only select, and both reduce the selected ranks in the same order)."""
    saved = order_stats.NETWORK_MIN_SLICE_PER_INPUT
    out = {}
    try:
        for name, threshold in PATHS.items():
            order_stats.NETWORK_MIN_SLICE_PER_INPUT = threshold
            out[name] = fn()
    finally:
        order_stats.NETWORK_MIN_SLICE_PER_INPUT = saved
    torch.testing.assert_close(out["network"], out["torch"], rtol=0, atol=0, equal_nan=True)
    return out["network"]


def _sample(n: int, k: int, ints: bool, seed: int, with_inf: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (3, n, k), generator=g).float() if ints else torch.randn(3, n, k, generator=g)
    if with_inf:
        x[:, 0] = float("inf")
        x[:, -1] = -float("inf")
    return x


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20), k=st.integers(1, 7), ints=st.booleans(), seed=st.integers(0, 2**16))
def test_medians_equal_torch(n, k, ints, seed):
    x = _sample(n, k, ints, seed, with_inf=seed % 5 == 0)
    s = torch.sort(x, dim=1).values
    assert torch.equal(_both_paths(lambda: order_stats.lower_median(x, 1)), torch.median(x, dim=1).values)
    assert torch.equal(_both_paths(lambda: order_stats.upper_median(x, 1)), s[:, n // 2])
    if n % 2 == 0 and seed % 5 != 0:  # with +-inf the average is NaN on both sides
        expected = 0.5 * s[:, n // 2 - 1] + 0.5 * s[:, n // 2]
        assert torch.equal(_both_paths(lambda: order_stats.average_median(x, 1)), expected)
    xt = x.transpose(0, 1).contiguous()  # the peer axis first, as the (n, d) aggregators hold it
    assert torch.equal(_both_paths(lambda: order_stats.lower_median(xt, 0)), torch.median(xt, dim=0).values)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20), k=st.integers(1, 7), ints=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_trimmed_mean_keeps_the_middle_ranks(n, k, ints, seed, data):
    f = data.draw(st.integers(0, (n - 1) // 2))
    x = _sample(n, k, ints, seed, with_inf=False)
    expected = torch.sort(x, dim=1).values[:, f : n - f].sum(dim=1) / (n - 2 * f)
    torch.testing.assert_close(_both_paths(lambda: order_stats.trimmed_mean(x, 1, f)), expected, rtol=1e-6, atol=1e-6)


def test_chunked_large_input_matches_unchunked():
    """Inputs larger than a cache chunk are cut along another axis; no value may change."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 50_000, generator=g)
    assert x[0].numel() * 4 > order_stats.CHUNK_BYTES
    assert order_stats._network_pays(x, 0)  # the default threshold takes the network here
    assert torch.equal(order_stats.lower_median(x, 0), torch.median(x, dim=0).values)
    s = torch.sort(x, dim=0).values
    assert torch.equal(order_stats.average_median(x, 0), 0.5 * s[7] + 0.5 * s[8])
    torch.testing.assert_close(order_stats.trimmed_mean(x, 0, 3), s[3:13].mean(dim=0), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n > 2f"):
        order_stats.trimmed_mean(torch.zeros(4, 2), 0, 2)
    with pytest.raises(ValueError, match="empty"):
        order_stats.lower_median(torch.zeros(0, 3), 0)


def test_short_slices_take_torch_and_long_ones_the_network():
    assert not order_stats._network_pays(torch.zeros(512, 2000), 0)
    assert order_stats._network_pays(torch.zeros(16, 105_866), 0)
    assert order_stats._network_pays(torch.zeros(15, 15, 7058), 1)
