"""Attacks on the BTARD protocol itself (`requires_defense = ("btard",)`); called by byztrain.protocol.

On gradients these attackers behave honestly (combine with a gradient attack, e.g.
`attack.name: "sign_flip+false_accusation"`, for both). Each misbehaviour is one the protocol is designed to
catch: the attacker should be banned and no honest peer with it. None of these is simulated by the BTARD
paper's code (its ResNet simulation has no Byzantine aggregators or false accusations); no peer library has
protocol attacks. Random draws come from generators seeded by (run seed, step, peer), so runs replay exactly.
"""

from __future__ import annotations

import torch

from byztrain.attacks._util import check_choice, check_number, generator, unit_direction
from byztrain.attacks.base import Attack, register

BTARD = ("btard",)


@register
class BadAggregation(Attack):
    """As aggregator of partition j, publish `agg_j + size * ||agg_j|| * u` instead of the CenteredClip result.

    u is a random unit direction of the partition's length, drawn per (step, attacker, partition); `size`
    (default 1e-2) is relative to the norm of the true aggregated part: 1e-2 is a plausible-looking error,
    1e7 an explosion. If the true part is exactly zero the shift is zero. BTARD's check (random projections
    z drawn after the aggregates are public, tolerance bounded by n * tau whatever the aggregate) sends the
    partition to a dispute, which convicts the aggregator in the step it publishes.
    """

    name = "bad_aggregation"
    defaults = {"size": 1e-2}
    requires_defense = BTARD

    def check_params(self):
        check_number(self, "size", low=0.0, low_open=True)

    def on_aggregate(self, partition, value, ctx):
        flat = value.reshape(-1)
        u = unit_direction(flat.numel(), generator(ctx.run_seed, "bad_aggregation", ctx.step, ctx.peer,
                                                   int(partition)), flat)
        return (flat + u * (float(self.params["size"]) * flat.norm())).view_as(value)


@register
class FalseAccusation(Attack):
    """Accuse an honest peer of sending a wrong gradient: with probability `rate` per attack step (default 1).

    The target is drawn uniformly among this step's active honest peers (`ctx.active` minus
    `ctx.byzantine`) with a generator seeded by (run seed, step, attacker); the reason given is
    "gradient". Under BTARD's ACCUSE rule everyone recomputes the target's gradient, finds it correct, and
    bans the accuser instead.
    """

    name = "false_accusation"
    defaults = {"rate": 1.0}
    requires_defense = BTARD

    def check_params(self):
        check_number(self, "rate", low=0.0, high=1.0)

    def accusations(self, ctx):
        honest = [p for p in ctx.active if p not in ctx.byzantine and p != ctx.peer]
        if not honest:
            return []
        gen = generator(ctx.run_seed, "false_accusation", ctx.step, ctx.peer)
        if float(torch.rand((), generator=gen)) >= float(self.params["rate"]):
            return []
        target = honest[int(torch.randint(len(honest), (), generator=gen))]
        return [(target, "gradient")]


@register
class LieInCheck(Attack):
    """Broadcast wrong check scalars: `s * (1 + size)` and/or `d * (1 + size)` instead of the true s, d.

    s_ij = <z_j, g_i[j] - agg[j]> and d_ij = ||g_i[j] - agg[j]|| are the scalars of BTARD's aggregation
    check. `scalars` chooses which lie: "s" (default), "d" or "both"; `size` (default 0.1) is the relative
    error, applied to every scalar the attacker broadcasts this step. Aggregator j re-derives s_ij, d_ij from
    the parts it holds and accuses the liar. A scalar that is exactly zero stays zero.
    """

    name = "lie_in_check"
    defaults = {"size": 0.1, "scalars": "s"}
    requires_defense = BTARD

    def check_params(self):
        check_number(self, "size", low=0.0, low_open=True)
        check_choice(self, "scalars", ("s", "d", "both"))

    def on_check_scalars(self, s, d, ctx):
        f = 1.0 + float(self.params["size"])
        which = self.params["scalars"]
        if which in ("s", "both"):
            s = s * f
        if which in ("d", "both"):
            d = d * f
        return s, d


@register
class MPRNGWithhold(Attack):
    """Commit to an MPRNG secret but withhold the reveal (`on_mprng_reveal` returns None) at every attack step.

    A peer that does not reveal could otherwise bias the shared randomness by choosing whether to reveal
    after seeing the others; BTARD bans non-revealers and restarts the MPRNG without them.
    """

    name = "mprng_withhold"
    requires_defense = BTARD

    def on_mprng_reveal(self, secret, ctx):
        return None


@register
class Silent(Attack):
    """Send nothing: `on_send_parts` returns None, so no partition reaches its aggregator this step.

    Models a crashed or stonewalling peer. It still commits to its hashes if the protocol asks (the hooks
    only replace what it sends). BTARD treats the missing parts as a (non-provable) fault.
    """

    name = "silent"
    requires_defense = BTARD

    def on_send_parts(self, parts, ctx):
        return None


@register
class SelfCover(Attack):
    """As aggregator of partition j, publish `scale * agg_j` (default -10) and cover it in the check.

    The cover: the aggregator holds every part of its partition, so once z is public it computes every
    other row's term of the check sum sum_i w_ij s_ij for its wrong aggregate, and reports for its own row
    the s_jj that cancels them (d_jj truthful, so its weight stays what everyone computes). Against a check
    where nobody re-derives the aggregator's own scalars this passes every time. BTARD's aggregators
    reveal their own part with the aggregate, so everyone re-derives s_jj and the lie bans the aggregator
    in the step it publishes.
    """

    name = "self_cover"
    defaults = {"scale": -10.0}
    requires_defense = BTARD

    def check_params(self):
        check_number(self, "scale")
        if float(self.params["scale"]) == 1.0:
            raise self.param_error("scale", "must differ from 1 (1 publishes the true aggregate)")

    def on_aggregate(self, partition, value, ctx):
        return value * float(self.params["scale"])

    def on_check_scalars(self, s, d, ctx):
        x = ctx.extra.get("partition_rows")  # (n, k): the parts this aggregator received, its own included
        if x is None:
            return s, d
        jj, me = ctx.extra["partition"], ctx.extra["row"]
        diff = x.to(torch.float64) - ctx.extra["aggregate"].to(torch.float64)
        dist = torch.linalg.vector_norm(diff, dim=1)
        w = torch.clamp(self.config.defense.tau / dist, max=1.0)
        terms = w[:, None] * (diff @ ctx.extra["z"].to(torch.float64).T)  # (n, q)
        others = terms.sum(dim=0) - terms[me]
        s = s.clone()
        s[jj] = -others / w[me]
        return s, d
