"""Protocol building blocks: partition layout, commitments, MPRNG, the projection check, validator drawing,
audits/ACCUSE. Pure functions and the in-process Collective; no training."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from byztrain.aggregators import centered_clip
from byztrain.comm import LocalCollective
from byztrain.protocol.bans import Accusation, StepRecord, audit, part_fault, resolve, rows_finite
from byztrain.protocol.commitments import (
    DigestCache,
    canonical_bytes,
    commit_parts,
    digest,
    is_commitment_list,
)
from byztrain.protocol.mprng import commitment, peer_key, run_mprng, secret_from_key, xor_bytes
from byztrain.protocol.partition import Layout, layout_for
from byztrain.protocol.validators import choose_validators
from byztrain.protocol.verification import (
    clip_mass,
    clip_weights,
    default_check_rtol,
    draw_projections,
    implausible,
    is_scalar_message,
    partition_scalars,
    peer_scalars,
    projection_seed,
    scalars_agree,
)

# ---- partition layout ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 300), peers=st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True))
def test_layout_round_trip_padding_and_contiguity(d, peers):
    layout = layout_for(d, tuple(peers))
    P, k = layout.parts, layout.part_size
    assert P == len(peers) and k == -(-d // P) and layout.padded >= d > layout.padded - P
    x = torch.randn(d)
    parts = layout.split(x)
    assert len(parts) == P and all(p.shape == (k,) and p.is_contiguous() for p in parts)
    flat = torch.cat(parts)
    assert torch.equal(flat[:d], x)  # contiguous chunks, in order
    assert torch.equal(flat[d:], torch.zeros(layout.padded - d))  # zero padding at the end
    assert torch.equal(layout.join(parts), x)
    assert torch.equal(layout.join(layout.pad(x)), x)
    assert torch.equal(layout.pad(x).reshape(-1), flat)
    for j in range(P):  # partition j belongs to the j-th peer in ascending order
        assert layout.peers[j] == sorted(peers)[j] and layout.index(sorted(peers)[j]) == j


def test_layout_is_identical_on_every_peer_and_changes_with_the_set():
    a = layout_for(1000, (5, 1, 9, 3))
    b = layout_for(1000, (1, 3, 5, 9))
    assert a == b and a.peers == (1, 3, 5, 9) and a.part_size == 250
    c = layout_for(1000, (1, 3, 9))  # peer 5 banned: 3 parts of 334 (2 zeros of padding)
    assert c.parts == 3 and c.part_size == 334 and c.padded == 1002
    with pytest.raises(ValueError):
        Layout(10, (3, 1))
    with pytest.raises(ValueError):
        layout_for(10, (1,)).split(torch.zeros(11))


def test_unpadded_parts_are_views_not_copies():
    x = torch.randn(100)
    parts = layout_for(100, (0, 1, 2, 3)).split(x)
    assert all(p.data_ptr() == x[25 * j :].data_ptr() for j, p in enumerate(parts))


# ---- commitments ----------------------------------------------------------------------------------


def test_commitment_is_sha256_of_little_endian_float32_bytes():
    x = torch.tensor([1.0, -2.5, 3e-8], dtype=torch.float32)
    assert bytes(canonical_bytes(x)) == struct.pack("<3f", 1.0, -2.5, 3e-8)
    import hashlib

    assert digest(x) == hashlib.sha256(struct.pack("<3f", 1.0, -2.5, 3e-8)).digest()
    # layout-independent: a strided view hashes like its contiguous copy
    m = torch.randn(6, 4)
    assert digest(m[:, 1]) == digest(m[:, 1].contiguous())
    with pytest.raises(ValueError, match="float32"):
        digest(torch.zeros(3, dtype=torch.float64))


def test_commitment_mismatch_detected_for_a_one_ulp_change():
    x = torch.randn(1000)
    y = x.clone()
    y[517] = torch.nextafter(y[517], torch.tensor(float("inf")))
    assert digest(x) != digest(y)
    c = commit_parts([x[:500], x[500:]])
    assert is_commitment_list(c, 2) and not is_commitment_list(c, 3) and not is_commitment_list([b"x"] * 2, 2)
    assert commit_parts([y[:500], y[500:]])[0] == c[0] and commit_parts([y[:500], y[500:]])[1] != c[1]


def test_digest_cache_sees_in_place_writes_through_views():
    base = torch.randn(200)
    part = base[100:]
    cache = DigestCache()
    h = cache.digest(part)
    assert cache.digest(part) == h and cache.hashed_bytes == 400  # second call: memo
    base[150] += 1.0  # a write through the base bumps the shared version counter
    assert cache.digest(part) != h and cache.digest(part) == digest(part)
    assert cache.matches(part, digest(part)) and not cache.matches(part, h)


# ---- MPRNG -----------------------------------------------------------------------------------------


def _secret(peer, round_):
    return secret_from_key(peer_key(b"k" * 32, peer), 3, round_, 0)


def test_mprng_is_the_xor_of_the_reveals():
    comm = LocalCollective(list(range(5)))
    res = run_mprng(comm, 3, [0, 1, 2, 3, 4], secret=_secret)
    want = xor_bytes([_secret(p, 0) for p in range(5)])
    assert res.digest == want and res.value == int.from_bytes(want[:8], "little")
    assert res.rounds == 1 and res.banned == {} and res.participants == (0, 1, 2, 3, 4)
    # any single honest secret changes the output
    res2 = run_mprng(comm, 3, [0, 1, 2, 3, 4], secret=lambda p, r: _secret(p, r) if p != 2 else bytes(32))
    assert res2.value != res.value


def test_mprng_withholder_is_banned_and_the_round_reruns_without_it_with_fresh_secrets():
    comm = LocalCollective(list(range(5)))
    banned = []
    res = run_mprng(
        comm,
        3,
        [0, 1, 2, 3, 4],
        secret=_secret,
        reveal=lambda p, x: None if p == 2 else x,
        on_ban=lambda p, why: banned.append((p, why)),
    )
    assert banned == [(2, "mprng: withheld reveal")]
    assert res.rounds == 2 and res.participants == (0, 1, 3, 4)
    assert res.digest == xor_bytes([_secret(p, 1) for p in (0, 1, 3, 4)])  # round-1 secrets, not reused


@pytest.mark.parametrize(
    "reveal, commit, why",
    [
        (lambda p, x: bytes(32) if p == 1 else x, None, "does not open"),
        (lambda p, x: b"short" if p == 1 else x, None, "malformed reveal"),
        (None, lambda p, c: None if p == 1 else c, "no commitment"),
        (None, lambda p, c: c[:5] if p == 1 else c, "malformed commitment"),
    ],
)
def test_mprng_bad_reveal_or_commitment_bans_only_that_peer(reveal, commit, why):
    comm = LocalCollective(list(range(4)))
    res = run_mprng(comm, 9, [0, 1, 2, 3], secret=_secret, reveal=reveal, commit_override=commit)
    assert list(res.banned) == [1] and why in res.banned[1]
    assert res.participants == (0, 2, 3)


def test_copying_an_honest_commitment_does_not_work_because_commitments_bind_step_and_peer():
    """Byzantine peer 3 copies peer 1's commitment and, rushing, reveals peer 1's secret: without binding,
    x_1 XOR x_1 would cancel peer 1's contribution. Bound to (step, peer), its opening fails: banned."""
    comm = LocalCollective(list(range(4)))
    step = 11
    honest_c = commitment(step, 1, _secret(1, 0))
    res = run_mprng(
        comm,
        step,
        [0, 1, 2, 3],
        secret=_secret,
        commit_override=lambda p, c: honest_c if p == 3 else c,
        reveal=lambda p, x: _secret(1, 0) if p == 3 else x,
    )
    assert list(res.banned) == [3] and "does not open" in res.banned[3]
    assert commitment(step, 3, _secret(1, 0)) != honest_c
    assert commitment(step + 1, 1, _secret(1, 0)) != honest_c  # and bound to the step: no replay


def test_mprng_gives_up_when_everyone_is_banned():
    comm = LocalCollective([0, 1])
    with pytest.raises(RuntimeError, match="every participant"):
        run_mprng(comm, 1, [0, 1], secret=_secret, reveal=lambda p, x: None)


# ---- the projection check -------------------------------------------------------------------------


def _partition(n=9, k=400, seed=0, tau=1.5):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(k, generator=g) + 0.1 * torch.randn(n, k, generator=g)
    x[:2] += 3.0 * torch.randn(2, k, generator=g)  # two outliers, clipped
    v = centered_clip(x, tau, tol=1e-9, max_iters=5000)
    return x, v, tau


def _relative_residual(s, d, tau):
    """max over directions of |sum_i w_i s_i| / sum_i min(d_i, tau): the number the check compares."""
    return float((clip_weights(d, tau)[:, None] * s).sum(dim=0).abs().max() / clip_mass(d[:, None], tau)[0])


def test_fixed_point_passes_and_a_small_aggregation_error_fails():
    x, v, tau = _partition()
    n, k = x.shape
    z64 = draw_projections(123, 3, 1, k)[:, 0].to(torch.float64)
    s, d = partition_scalars(x, v, z64)
    rtol = default_check_rtol(1e-6, n)
    assert _relative_residual(s, d, tau) < rtol / 10
    assert not implausible(s[:, None], d[:, None], 7.0).any()
    g = torch.Generator().manual_seed(5)
    u = torch.randn(k, generator=g)
    bad = v + u / u.norm() * 1e-3 * v.norm()
    s, d = partition_scalars(x, bad, z64)
    assert _relative_residual(s, d, tau) > rtol


def test_huge_aggregate_fails_by_a_margin_that_does_not_shrink_with_its_size():
    """The tolerance is bounded by n * tau whatever the aggregator publishes: an aggregate moved by
    1e7 x its norm makes every row's clipped pull tau in nearly the same direction."""
    x, v, tau = _partition()
    n, k = x.shape
    z64 = draw_projections(7, 3, 1, k)[:, 0].to(torch.float64)
    for size in (1e-1, 1e2, 1e7):
        s, d = partition_scalars(x, v * (1 + size), z64)
        assert _relative_residual(s, d, tau) > 100 * default_check_rtol(1e-6, n)
        assert float(clip_mass(d[:, None], tau)[0]) <= n * tau


def test_sender_and_aggregator_scalars_agree_and_a_lie_is_flagged():
    x, v, tau = _partition(n=5, k=90)
    P, q = 3, 2
    k = 30
    ghat = torch.stack([v[j * k : (j + 1) * k] for j in range(P)])  # treat the vector as 3 partitions
    z = draw_projections(1, q, P, k)
    z64 = z.to(torch.float64)
    z_norms = torch.linalg.vector_norm(z64, dim=2).T  # (P, q)
    sender = x[0].view(P, k)
    s, d = peer_scalars(sender, ghat, z64)
    for j in range(P):
        s_j, d_j = partition_scalars(x[:, j * k : (j + 1) * k], ghat[j], z64[:, j])
        assert scalars_agree(s[j : j + 1], d[j : j + 1], s_j[:1], d_j[:1], z_norms[j], 1e-12).all()
    lie = s.clone()
    lie[1, 0] *= 1 + 1e-6
    ok = scalars_agree(lie, d, s, d, z_norms, 1e-8)
    assert ok.tolist() == [True, False, True]
    assert not scalars_agree(s, d * 1.001, s, d, z_norms, 1e-8).any()


def test_clip_weights_and_message_shapes():
    w = clip_weights(torch.tensor([0.0, 0.5, 1.0, 4.0]), 1.0)
    assert w.tolist() == [1.0, 1.0, 1.0, 0.25] and w.dtype == torch.float64
    s, d = torch.zeros(4, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert is_scalar_message((s, d), 4, 3)
    assert not is_scalar_message((s, d), 4, 2)
    assert not is_scalar_message((s.float(), d), 4, 3)
    assert not is_scalar_message((s, -d), 4, 3)
    assert not is_scalar_message((s, d * float("nan")), 4, 3)
    assert not is_scalar_message(s, 4, 3)


def test_projections_are_reproducible_from_the_shared_randomness():
    a = draw_projections(projection_seed(99, 4, 0), 2, 3, 5)
    assert torch.equal(a, draw_projections(projection_seed(99, 4, 0), 2, 3, 5))
    assert not torch.equal(a, draw_projections(projection_seed(99, 4, 1), 2, 3, 5))  # rerun: fresh z
    assert not torch.equal(a, draw_projections(projection_seed(98, 4, 0), 2, 3, 5))
    assert a.shape == (2, 3, 5) and a.dtype == torch.float32


# ---- validators -----------------------------------------------------------------------------------


def test_validator_drawing_is_deterministic_and_well_formed():
    active = [0, 1, 2, 4, 5, 7, 8]
    prev = [0, 1, 2, 3, 4, 5, 8]  # 3 was banned since, 7 was a validator at t-1
    seen_v, seen_t = set(), set()
    for r in range(300):
        pairs = choose_validators(r * 7919, 10, active, prev, 2)
        assert pairs == choose_validators(r * 7919, 10, active, prev, 2)
        vs = [v for v, _ in pairs]
        assert len(set(vs)) == 2 and set(vs) <= set(active)
        for v, t in pairs:
            assert t != v and t in prev and t in active
            seen_v.add(v)
            seen_t.add(t)
    assert seen_v == set(active)  # every active peer gets drawn
    assert seen_t == {0, 1, 2, 4, 5, 8}
    assert choose_validators(1, 1, active, None, 1) == []  # first step: nobody to check
    assert choose_validators(1, 5, active, prev, 0) == []
    assert len(choose_validators(1, 5, [0, 1, 2], [0, 1, 2], 5)) == 1  # capped at active - 2


def test_validator_frequency_matches_one_over_n():
    active = list(range(16))
    hits = sum(1 for r in range(4000) if choose_validators(r, 3, active, active, 1)[0][1] == 5)
    assert abs(hits / 4000 - 1 / 15) < 0.015  # target uniform among the 15 others


# ---- audits and ACCUSE ------------------------------------------------------------------------------


def _record(grads: dict[int, torch.Tensor], q=2):
    d = next(iter(grads.values())).numel()
    layout = layout_for(d, tuple(sorted(grads)))
    rec = StepRecord(step=4, attempt=0, layout=layout)
    for p, g in grads.items():
        rec.commitments[p] = commit_parts(layout.split(g))
    rec.ghat = layout.pad(torch.stack(list(grads.values())).mean(0))
    rec.z = draw_projections(3, q, layout.parts, layout.part_size)
    for p, g in grads.items():
        rec.scalars[p] = peer_scalars(layout.pad(g), rec.ghat, rec.z.to(torch.float64))
    return rec


def test_audit_and_accuse():
    grads = {p: torch.randn(50) for p in (0, 2, 3, 6)}
    rec = _record(grads)
    assert audit(rec, 2, grads[2]) == (None, [])
    other = grads[2].clone()
    other[40] += 1e-4
    why, _ = audit(rec, 2, other)  # what peer 2 committed is not its gradient
    assert "part 3" in why
    s, d = rec.scalars[3]
    rec.scalars[3] = (s.clone().index_fill_(0, torch.tensor([1]), 0.5), d)
    why, lied = audit(rec, 3, grads[3])
    assert lied == [1] and "check scalars" in why
    recompute = grads.__getitem__
    guilty, _, lied = resolve(Accusation(0, 3, 4, "x"), {4: rec}, lambda p, s: recompute(p))
    assert guilty == 3 and lied == [1]
    guilty, why, _ = resolve(Accusation(3, 0, 4, "x"), {4: rec}, lambda p, s: recompute(p))
    assert guilty == 3 and "false accusation" in why  # 0 is innocent: the accuser pays
    guilty, why, _ = resolve(Accusation(0, 5, 4, "x"), {4: rec}, lambda p, s: recompute(p))
    assert guilty == 0  # 5 committed nothing at step 4
    guilty, _, _ = resolve(Accusation(0, 2, 9, "x"), {4: rec}, lambda p, s: recompute(p))
    assert guilty == 0  # no record of step 9


def test_message_faults_and_fast_finiteness():
    assert part_fault(torch.zeros(4), 4) is None
    assert "shape" in part_fault(torch.zeros(5), 4)
    assert "dtype" in part_fault(torch.zeros(4, dtype=torch.float64), 4)
    assert "tensor" in part_fault([0.0] * 4, 4)
    assert "non-finite" in part_fault(torch.tensor([0.0, float("inf"), 0, 0]), 4)
    assert part_fault(torch.tensor([0.0, float("nan"), 0, 0]), 4, finite=False) is None
    x = torch.tensor([[3e38, 3e38], [1.0, float("nan")], [float("inf"), -float("inf")], [0.0, 1.0]])
    assert rows_finite(x).tolist() == [True, False, False, True]  # an overflowing sum is still finite


