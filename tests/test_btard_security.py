"""BTARD against attackers who know everything public: each test plays the attacker that tries to pass one
check (the largest error it lets through, a lie in the value nobody else re-derives, a malformed message)
and asserts the cheater is banned in the step it cheats and no honest peer ever is."""

from __future__ import annotations

import pytest
import torch

from byztrain.attacks import Attack, build_attack
from byztrain.comm import LocalCollective
from byztrain.runtime.trainer import choose_byzantine
from test_btard import bans, expected_update, make_trainer, run_step

pytestmark = pytest.mark.usefixtures("one_thread")


def with_catalogue_attack(tr, name, byzantine, start, stop=None, **params):
    """Give `tr` `byzantine` attackers running the catalogue attack `name` in [start, stop)."""
    over = {"byzantine": byzantine, "attack.name": name, "attack.start": start}
    if stop is not None:
        over["attack.stop"] = stop
    over.update({f"attack.params.{k}": v for k, v in params.items()})
    tr.config = tr.config.with_overrides(over)
    tr.byzantine = choose_byzantine(tr.config)
    tr.attacks = {p: build_attack(tr.config, p) for p in tr.byzantine}
    return tr


def honest_bans(tr):
    return {p: e for p, e in bans(tr).items() if p not in tr.byzantine}


# ---- a huge aggregate: the tolerance must not grow with the aggregator's own output ------------------


@pytest.mark.parametrize("size", [1e7, 1e2, 1.0, 1e-2])
def test_bad_aggregation_of_any_size_is_banned_in_the_step_it_is_published(synthetic, size):
    tr = with_catalogue_attack(make_trainer(peers=8, validators=1), "bad_aggregation", 1, start=3, stop=4, size=size)
    (liar,) = tr.byzantine
    norms = []
    for step in range(1, 7):
        if step == 3:
            want, _ = expected_update(tr, exclude=(liar,))
        record, got = run_step(tr)
        norms.append(float(got.norm()))
        if step == 3:
            assert torch.equal(got, want)  # the update applied is the honest rest's aggregate
    assert set(bans(tr)) == {liar}
    assert bans(tr)[liar]["step"] == 3
    assert "disputed partition" in bans(tr)[liar]["reason"]
    assert max(norms) < 10 * min(norms)  # nothing exploded


# ---- an aggregator covering its own partition -----------------------------------------------------


def test_self_cover_is_banned_at_its_first_wrong_aggregate_and_only_it(synthetic):
    tr = with_catalogue_attack(make_trainer(peers=8, validators=1), "self_cover", 1, start=3)
    (cheat,) = tr.byzantine
    for _ in range(6):
        tr.train_step()
    assert set(bans(tr)) == {cheat}
    assert bans(tr)[cheat]["step"] == 3
    assert "own partition" in bans(tr)[cheat]["reason"]


def test_self_cover_would_pass_a_check_that_trusts_the_aggregators_own_scalars(synthetic, monkeypatch):
    """The attack has teeth: with the own-row re-derivation and the plausibility bound switched off (the
    check as it stood before both), its cover makes the check pass and the wrong aggregate goes through
    unpunished."""
    from byztrain.protocol.btard import BtardDefense

    monkeypatch.setattr(BtardDefense, "_check_own_rows", lambda self, *a: None)
    off = lambda s, *a: torch.zeros(s.shape[1], dtype=torch.bool)  # noqa: E731
    monkeypatch.setattr("byztrain.protocol.btard.implausible", off)
    monkeypatch.setattr("byztrain.protocol.btard.off_centre", off)
    tr = with_catalogue_attack(make_trainer(peers=8, validators=0), "self_cover", 1, start=3, stop=4)
    for _ in range(3):
        tr.train_step()
    assert bans(tr) == {}
    assert not any(e["type"] == "check_failed" for e in tr.events)


def test_colluding_scalar_liars_are_exposed_when_their_lies_are_implausible(synthetic):
    """A lie beyond scalar_bound x d_ij sends the partition to a dispute, where the public parts expose
    every liar: colluders cannot cover a wrong aggregate with arbitrarily large scalars."""

    class BigLiar(Attack):
        def on_aggregate(self, partition, value, ctx):
            return -10.0 * value

        def on_check_scalars(self, s, d, ctx):
            partner = [p for p in ctx.byzantine if p != ctx.peer][0]
            s = s.clone()
            s[ctx.active.index(partner)] *= 1e3  # no validators: partition index = position among active
            return s, d

    tr = make_trainer(peers=8, validators=0, byzantine=(2, 5), attack=BigLiar)
    tr.train_step()
    assert set(bans(tr)) == {2, 5}
    assert {e["partition"] for e in tr.events if e["type"] == "check_failed"} == {2, 5}
    assert all("disputed partition" in e["reason"] for e in bans(tr).values())


def test_the_median_rule_catches_a_wrong_aggregate_covered_by_colluding_liars():
    """4 of 16 rows collude with the aggregator: for each direction they report the largest plausible
    scalars (|s| <= 7 d, d as large as they like) that cancel the weighted sum. Over many draws they pass
    the sum and plausibility tests about half the time (docs/protocol.md, collusion); the median of the
    scalars, which moves with the cheat while their spread does not, flags all but a few of those draws
    (a cheat escapes only when all q projections of its error are small against the honest spread)."""
    from byztrain.aggregators import centered_clip_irls_batched
    from byztrain.protocol.verification import clip_mass, default_check_rtol, implausible, off_centre

    g = torch.Generator().manual_seed(0)
    n, k, tau, q, liars = 16, 1000, 1.0, 3, 4
    x = 0.03 * torch.randn(n, k, generator=g) + 0.02 * torch.randn(k, generator=g)
    v, _ = centered_clip_irls_batched(x[None], tau)
    rtol = default_check_rtol(1e-6, n)
    passed_old, caught = 0, 0
    for _ in range(200):
        u = torch.randn(k, generator=g, dtype=torch.float64)
        fake = v[0].double() + 100 * tau * u / u.norm()
        z = torch.randn(q, k, generator=g, dtype=torch.float64)
        diff = x.double() - fake
        s, d = diff @ z.T, diff.norm(dim=1)
        honest_sum = (torch.clamp(tau / d[liars:], max=1.0)[:, None] * s[liars:]).sum(dim=0)  # (q,)
        d_lie = torch.full((liars,), 1e6, dtype=torch.float64)  # weight tau / 1e6, room for |s| <= 7e6
        s_lie = (-honest_sum / liars / (tau / d_lie[0])).expand(liars, q).clone()
        S, D = torch.cat([s_lie, s[liars:]]), torch.cat([d_lie, d[liars:]])
        R = (torch.clamp(tau / D, max=1.0)[:, None] * S).sum(dim=0)
        mass = clip_mass(D[:, None], tau)[0]
        if bool((R.abs() <= rtol * mass).all()) and not bool(implausible(S[:, None], D[:, None], 7.0)[0]):
            passed_old += 1
            caught += bool(off_centre(S[:, None], 8.0, tau)[0])
    assert passed_old > 50  # the cover works against the sum and plausibility tests alone
    assert caught >= 0.97 * passed_old


# ---- honest peers are never banned for numerics -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("peers", [8, 32])
@pytest.mark.parametrize("tau", [0.01, 0.03, 0.1, 1.0, 10.0, 1000.0])
def test_honest_runs_ban_nobody_for_any_tau(synthetic, peers, tau):
    tr = make_trainer(peers=peers, validators=1, tau=tau)
    unconverged = 0
    for _ in range(100):
        record = tr.train_step()
        unconverged += record.get("cclip_unconverged", 0)
    assert bans(tr) == {}
    assert not [e for e in tr.events if e["type"] in ("check_failed", "restart", "accuse")]
    assert unconverged == 0


# ---- the commitment check sees the bytes received -----------------------------------------------


class RewritesPartsInPlace(Attack):
    """Commits to its true parts, then rewrites them in place (bypassing autograd's version counter)."""

    def on_send_parts(self, parts, ctx):
        for p in parts.values():
            p.data.add_(1.0)
        return parts


class RewritesLater(Attack):
    """Keeps the gradient tensor it was shown and rewrites it in place when the parts go out."""

    def on_gradient(self, g, ctx):
        self.kept = g
        return g

    def on_send_parts(self, parts, ctx):
        self.kept.data.mul_(-1.0)
        return parts


@pytest.mark.parametrize("cls", [RewritesPartsInPlace, RewritesLater])
def test_a_part_rewritten_after_its_commitment_is_caught(synthetic, cls):
    tr = make_trainer(peers=7, validators=0, byzantine=(4,), attack=cls)
    want, _ = expected_update(tr)
    _, got = run_step(tr)
    banned = bans(tr)
    if cls is RewritesLater:  # it held only a copy: what it sends is what it committed to, nothing leaks
        assert banned == {}
        assert torch.equal(got, want)
        return
    assert set(banned) == {4}
    assert "commitment" in banned[4]["reason"]


# ---- malformed hook results and wire fields ---------------------------------------------------------


def _hook(name, value):
    def hook(self, *args):
        return value(args) if callable(value) else value

    return type(f"Returns_{name}", (Attack,), {name: hook})


MALFORMED_HOOKS = {
    "scalars_none": _hook("on_check_scalars", None),
    "scalars_wrong_shape": _hook("on_check_scalars", lambda a: (a[0][:1], a[1])),
    "accusation_three_fields": _hook("accusations", [(0, "x", 1)]),
    "accusation_tensor_id": _hook("accusations", [(torch.tensor(0), "x")]),
    "accusations_not_a_list": _hook("accusations", "everyone"),
    "gradient_wrong_length": _hook("on_gradient", lambda a: a[0][:-1]),
    "gradient_float64": _hook("on_gradient", lambda a: a[0].double()),
    "batch_garbage": _hook("on_batch", lambda a: a[0]),
    "aggregate_string": _hook("on_aggregate", "nothing"),
    "aggregate_wrong_shape": _hook("on_aggregate", lambda a: a[1][:-2]),
    "parts_as_list": _hook("on_send_parts", lambda a: list(a[0].values())),
    "reveal_int": _hook("on_mprng_reveal", 7),
    "omniscient_wrong_shape": type("OmniBad", (Attack,), {"is_omniscient": True,
                                                          "omniscient": lambda self, h, ctx: h[:, :3].sum(0)}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_HOOKS))
def test_a_malformed_hook_result_bans_its_peer_and_never_crashes(synthetic, name):
    attacker = 3
    tr = make_trainer(peers=7, validators=1, byzantine=(attacker,), attack=MALFORMED_HOOKS[name])
    for _ in range(4):
        tr.train_step()
    banned = bans(tr)
    assert set(banned) == {attacker}, tr.events
    assert tr.active == [p for p in range(7) if p != attacker]


def test_a_malformed_report_bans_the_reporter(synthetic):
    class Reporter(Attack):
        def on_report(self, target, reason, ctx):
            return "yes"

    class Liar(Attack):
        def on_check_scalars(self, s, d, ctx):
            return s * 1.01, d

    tr = make_trainer(peers=7, validators=0)
    tr.config = tr.config.with_overrides({"byzantine": 2, "attack.name": "silent"})
    tr.byzantine = [2, 5]
    tr.attacks = {2: Reporter({}, tr.config, 2), 5: Liar({}, tr.config, 5)}
    tr.train_step()
    assert 2 in bans(tr) and "malformed" in bans(tr)[2]["reason"]
    assert set(bans(tr)) <= {2, 5}


class RewritingCollective(LocalCollective):
    """An in-process network on which one peer's `nth` empty-list broadcast of a step (1: its complaints,
    2: its check-phase accusations) is replaced by a forged message."""

    def __init__(self, peers, sender, nth, forged):
        super().__init__(peers)
        self.sender, self.nth, self.forged, self.seen = sender, nth, forged, 0

    def all_gather(self, local, peers):
        got = super().all_gather(local, peers)
        if got.get(self.sender) == [] and not isinstance(got.get(self.sender), tuple):
            self.seen += 1
            if self.seen == self.nth:
                got = dict(got)
                got[self.sender] = self.forged
        return got


@pytest.mark.parametrize(
    "nth, forged",
    [
        (1, [(torch.tensor(1), "missing", None)]),
        (1, [([1], "missing", None)]),
        (1, [(1, "missing")]),
        (2, [(torch.tensor(1), "x", 1)]),
        (2, [(True, "x", 1)]),
        (2, [(1, "x")]),
        (2, [(1, "x", [1])]),
        (2, [(1, "x", 1.0)]),
    ],
)
def test_wire_fields_of_the_wrong_type_ban_the_sender(synthetic, nth, forged):
    sender = 4
    tr = make_trainer(peers=7, validators=0)
    tr.comm = RewritingCollective(list(range(7)), sender, nth, forged)
    tr.train_step()
    assert set(bans(tr)) == {sender}
    assert "malformed" in bans(tr)[sender]["reason"]
