"""ByzFL's "optimal" attacks and its two simplest ones: inf, gaussian, optimal_alie, optimal_ipm.

The optimal attacks (ByzFL 0.0.11 ``Optimal_ALittleIsEnough`` / ``Optimal_InnerProductManipulation``)
choose their factor each step by a line search that maximises ||defense(honest + b copies) - mean(honest)||,
where the defense is the one the run uses, pre-aggregators included: the config is public in the threat
model, so the attackers rebuild it. Randomised rules (bucketing, dnc, sign_guard, power-mode caf / smea)
run on the attackers' own generator, reseeded to one value for every candidate of a step (the defense's
own draws are not known in advance). Under BTARD the search runs against BTARD's aggregation as
benchmarks/bench_aggregators.py lays it out: n contiguous partitions, one CenteredClip with defense.tau
each; validators then catch the attackers like any gradient attack.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from byztrain import aggregators as A
from byztrain.attacks._util import derive_seed, generator
from byztrain.attacks.base import Attack, register
from byztrain.attacks.omniscient import _Omniscient, honest_std
from byztrain.defenses import server_pipeline
from byztrain.registry import Int, Param, Real


@register
class Inf(Attack):
    """Send a vector of +inf (ByzFL ``Inf``). Non-finite messages are malformed under BTARD (banned at once);
    a baseline rule sees them as they are."""

    name = "inf"
    reference = "ByzFL Inf"

    def on_gradient(self, g, ctx):
        return torch.full_like(g, math.inf)


@register
class Gaussian(Attack):
    """Send N(mu, sigma^2) noise, independent of the gradient (ByzFL ``Gaussian``, defaults mu = 0,
    sigma = 1). As in ByzFL, where one Byzantine vector is drawn and sent by every attacker, all attackers
    send the same draw at a step: it comes from a generator seeded by (run seed, step), fresh each step."""

    name = "gaussian"
    reference = "ByzFL Gaussian"
    spec = (
        Param("mu", Real(), 0.0, "mean of the noise"),
        Param("sigma", Real(0), 1.0, "standard deviation of the noise"),
    )

    def on_gradient(self, g, ctx):
        noise = torch.randn(g.numel(), generator=generator(ctx.run_seed, "gaussian", ctx.step))
        noise = noise.mul_(float(self.params["sigma"])).add_(float(self.params["mu"]))
        return noise.to(device=g.device, dtype=g.dtype).reshape(g.shape)


def _btard_like(config, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    tau, d = config.defense.tau, config.defense

    def run(x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[1]
        parts = torch.nn.functional.pad(x, (0, -dim % n)).reshape(n, n, -1).transpose(0, 1).contiguous()
        out, _ = A.centered_clip_batched(parts, tau, tol=d.cclip_tol, max_iters=d.cclip_max_iters)
        return out.reshape(-1)[:dim]

    return run


def defense_pipeline(config, n: int, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """The run's defense as a function of the (n, d) sent gradients, rebuilt from the public config."""
    d = config.defense
    if d.name == "btard":
        return _btard_like(config, n)
    pre, agg = server_pipeline(config, n, gen)

    def run(x: torch.Tensor) -> torch.Tensor:
        for p in pre:
            x = p(x)
        return agg(x)

    return run


class _Optimal(_Omniscient):
    """ByzFL's line search over the attack factor: an expansion phase from ``start`` by steps of ``delta``,
    doubling after each improvement, then (after the first failure, delta *= ratio) a contraction phase
    probing best + delta with delta *= ratio after every probe, ``evals`` evaluations in all."""

    spec = (
        Param("evals", Int(1), 20, "evaluations of the defense per step"),
        Param("start", Real(), 0.0, "first factor tried"),
        Param("delta", Real(), 10.0, "first step of the search (non-zero)"),
        Param("ratio", Real(0.5, 1, open_low=True, open_high=True), 0.8, "step shrink factor after each probe"),
    )

    def check_params(self):
        if self.params["delta"] == 0:
            raise self.param_error("delta", "must be non-zero")

    def vector(self, honest: torch.Tensor, factor: float) -> torch.Tensor:
        raise NotImplementedError

    def craft(self, honest, ctx):
        b = len(ctx.byzantine)
        seed = derive_seed(ctx.run_seed, "optimal", ctx.step)
        gen = torch.Generator().manual_seed(seed)
        defense = defense_pipeline(self.config, honest.shape[0] + b, gen)
        mean = honest.mean(dim=0)

        def distance(factor: float) -> float:
            gen.manual_seed(seed)  # one draw for every candidate: the search compares like with like
            x = torch.cat([honest, self.vector(honest, factor).expand(b, -1)])
            return float(torch.linalg.vector_norm((defense(x) - mean).double()))

        return self.vector(honest, self.search(distance))

    def search(self, distance: Callable[[float], float]) -> float:
        p = self.params
        best_x, delta, left = float(p["start"]), float(p["delta"]), int(p["evals"]) - 1
        best_y = distance(best_x)
        while left > 0:  # expansion
            y = distance(best_x + delta)
            left -= 1
            if y > best_y:
                best_x, best_y, delta = best_x + delta, y, delta * 2
            else:
                delta *= float(p["ratio"])
                break
        while left > 0:  # contraction
            y = distance(best_x + delta)
            left -= 1
            if y > best_y:
                best_x, best_y = best_x + delta, y
            delta *= float(p["ratio"])
        return best_x


@register
class OptimalALIE(_Optimal):
    """ALIE with a searched factor (ByzFL ``Optimal_ALittleIsEnough``): send mean + tau * std over the honest
    gradients (ByzFL's sign and ddof = 1; `alie` uses mean - z * std), tau found by the line search."""

    name = "optimal_alie"
    reference = "ByzFL Optimal_ALittleIsEnough"

    def vector(self, honest, factor):
        mean = honest.mean(dim=0)
        if honest.shape[0] < 2:
            return mean
        return mean + factor * honest_std(honest)


@register
class OptimalIPM(_Optimal):
    """IPM with a searched factor (ByzFL ``Optimal_InnerProductManipulation``): send -tau * mean(honest),
    tau found by the line search."""

    name = "optimal_ipm"
    reference = "ByzFL Optimal_InnerProductManipulation"

    def vector(self, honest, factor):
        return honest.mean(dim=0) * -factor
