"""Attacks on the BTARD protocol itself (`requires_defense = ("btard",)`); called by byztrain.protocol.

On gradients these attackers behave honestly (combine with a gradient attack, e.g.
`attack.name: "sign_flip+false_accusation"`, for both), except `validator_dodge`, which wraps one and
applies it only when it expects no honest validator to check it. Each misbehaviour is one the protocol is
designed to catch: the attacker should be banned and no honest peer with it. None of these is simulated by
the BTARD paper's code (its ResNet simulation has no Byzantine aggregators or false accusations); no peer
library has protocol attacks. Random draws come from generators seeded by (run seed, step, peer), so runs
replay exactly.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from byztrain.attacks._util import generator, unit_direction
from byztrain.attacks.base import Attack, register
from byztrain.protocol.mprng import xor_bytes
from byztrain.protocol.validators import choose_validators
from byztrain.registry import ATTACKS, TEXT, Choice, Param, Real

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
    reference = "byztrain (BTARD threat model)"
    spec = (Param("size", Real(0, open_low=True), 1e-2, "error added, relative to the aggregate's norm"),)
    requires_defense = BTARD

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
    reference = "byztrain (BTARD threat model)"
    spec = (Param("rate", Real(0, 1), 1.0, "probability of an accusation per attack step"),)
    requires_defense = BTARD

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
    reference = "byztrain (BTARD threat model)"
    spec = (
        Param("size", Real(0, open_low=True), 0.1, "relative error on the scalars"),
        Param("scalars", Choice(("s", "d", "both")), "s", "which scalars lie"),
    )
    requires_defense = BTARD

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
    reference = "byztrain (BTARD threat model)"
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
    reference = "byztrain (BTARD threat model)"
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
    reference = "byztrain (BTARD threat model)"
    spec = (Param("scale", Real(), -10.0, "factor on the true aggregate (not 1)"),)
    requires_defense = BTARD

    def check_params(self):
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


def guessed_secret(run_seed: int, step: int, peer: int, round_: int = 0, attempt: int = 0) -> bytes:
    """The attacker's guess at a peer's MPRNG secret: sha256 of (run seed, step, peer, round, attempt), all
    public. Right exactly when secrets are derived from public data this way, as byztrain's simulator once
    derived them; wrong (a uniformly random guess) when each honest peer keys its secrets privately."""
    blob = struct.pack("<qqqqq", run_seed, step, peer, round_, attempt)
    return hashlib.sha256(b"byztrain/mprng-secret" + blob).digest()


def predicted_shared_random(run_seed: int, step: int, participants) -> int:
    """r_t as MPRNG would output it if every participant's secret were `guessed_secret` and the first
    round of the first aggregation attempt went through (no ban before the reveal)."""
    xor = xor_bytes([guessed_secret(run_seed, step, p) for p in sorted(participants)])
    return int.from_bytes(xor[:8], "little")


@register
class ValidatorDodge(Attack):
    """Apply the wrapped gradient or data attack `base` (default `sign_flip`) only at steps where no honest
    validator will check this peer's gradient at the next step; send the honest gradient otherwise.

    Variant: a validator-aware cheater, the adversary BTARD's validator draw must defeat. At step t, before
    committing, it predicts r_t (which fixes step t+1's validators and targets) the only way public
    information allows: it recomputes every active peer's MPRNG secret as if secrets were a function of
    public data (`guessed_secret`: run seed, step, peer, round 0, attempt 0), XORs them, and runs the real
    draw (`byztrain.protocol.validators.choose_validators`) for step t+1 with this step's workers (the active
    peers minus step t's validators, drawn from the public r_{t-1}, `ctx.shared_random`). Byzantine
    validators collude (`on_report`), so only an honest validator targeting it counts. Assumes the step
    has no ban before the MPRNG (the attackers cause none) and m = `defense.validators`. Against
    predictable secrets it is never caught; against private secrets its guess is independent of the real
    draw, so it still cheats at most steps (about 90 % with 8 peers, 3 Byzantine) and is caught nearly as
    fast as a plain cheater (docs/protocol.md, section 1.1). The wrapped attack's hooks
    (`on_batch`, `on_gradient`, `omniscient`, `observe_true_gradient`) are delegated to an instance of it
    with its default parameters.
    """

    name = "validator_dodge"
    reference = "byztrain (BTARD threat model: validator-aware cheater)"
    spec = (Param("base", TEXT, "sign_flip", "the gradient or data attack applied when unchecked"),)
    requires_defense = BTARD

    def __init__(self, params, config, peer):
        super().__init__(params, config, peer)
        self.base = ATTACKS[self.params["base"]].obj({}, config, peer)
        self.is_omniscient = self.base.is_omniscient
        self._decision: tuple[int, bool] | None = None  # (step, attack at that step)

    def check_params(self):
        base = self.params["base"]
        cls = ATTACKS[base].obj if base in ATTACKS else None
        if cls is None or cls.requires_defense is not None:
            accepted = ", ".join(sorted(n for n, e in ATTACKS.items() if e.obj.requires_defense is None))
            raise self.param_error("base", f"must be a gradient or data attack ({accepted}), got {base!r}")

    def unchecked_next_step(self, ctx) -> bool:
        """Whether, by the attacker's prediction of r_t, no honest validator targets it at step t+1."""
        m = int(self.config.defense.validators)
        active = list(ctx.active)
        # Step t's validators come first in the draw and do not depend on the target candidates (only on
        # whether a previous step exists, i.e. t > 1), so `active` stands in for step t-1's workers here.
        now = choose_validators(ctx.shared_random, ctx.step, active, active if ctx.step > 1 else None, m)
        sitting = {v for v, _ in now}
        workers = [p for p in active if p not in sitting]
        r_t = predicted_shared_random(ctx.run_seed, ctx.step, active)
        following = choose_validators(r_t, ctx.step + 1, active, workers, m)
        return not any(target == ctx.peer and v not in ctx.byzantine for v, target in following)

    def attacks_now(self, ctx) -> bool:
        if self._decision is None or self._decision[0] != ctx.step:
            self._decision = (ctx.step, self.unchecked_next_step(ctx))
        return self._decision[1]

    def on_batch(self, x, y, ctx):
        return self.base.on_batch(x, y, ctx) if self.attacks_now(ctx) else (x, y)

    def on_gradient(self, g, ctx):
        return self.base.on_gradient(g, ctx) if self.attacks_now(ctx) else g

    def omniscient(self, honest, ctx):
        return self.base.omniscient(honest, ctx) if self.attacks_now(ctx) else None

    def observe_true_gradient(self, g, step):
        self.base.observe_true_gradient(g, step)
