"""Attacks that replace the gradient a peer sends, using only the peer's own gradient (`on_gradient`)."""

from __future__ import annotations

import torch

from byztrain.attacks._util import generator, unit_direction
from byztrain.attacks.base import Attack, register
from byztrain.registry import Int, Param, Real


@register
class SignFlip(Attack):
    """Send `scale * g`, where g is the attacker's true gradient.

    Default `scale` = -1000, as the BTARD ResNet code's `SignFlipper` (every parameter gradient x -1000; since
    the factor is a scalar, per tensor and whole vector are the same). Other libraries use -1 (ByzFL's
    `SignFlipping` sends -mean(honest); epfml's `BitFlippingWorker` and FL-Byzantine-Library send -g) or -100
    (Garfield `reverse`); set `attack.params.scale` to match them.
    """

    name = "sign_flip"
    reference = "BTARD code SignFlipper"
    spec = (Param("scale", Real(), -1000.0, "factor on the true gradient"),)

    def on_gradient(self, g, ctx):
        return g * float(self.params["scale"])


@register
class RandomDirection(Attack):
    """Send `scale * ||g|| * u`: one fixed random unit direction u, shared by all attackers, for every step.

    u is a standard-normal vector of the model's dimension normalised to unit L2 norm, drawn once from a
    generator seeded by `seed` (default: the run seed), so every attacker uses the same u (collusion) and the
    same u at every step. Each attacker scales it to `scale` (default 1000) times the norm of its *own* true
    gradient g at this step: all attackers point the same way; their norms differ as their gradients do.

    Follows the BTARD ResNet code's `ConstantDirection` (direction_seed = experiment seed, 1000 x norm,
    constant over steps), with one difference: the paper's code draws, normalises and scales the direction
    **per parameter tensor** (each tensor gets 1000 x that tensor's gradient norm); byztrain does it on the
    **whole flat gradient vector** (one u over all coordinates, scaled by the full ||g||). The total norm is
    identical (per tensor: 1000 x sqrt(sum_k ||g_k||^2) = 1000 x ||g||), but its spread over tensors differs:
    per tensor, tensor k gets a share proportional to its gradient norm ||g_k||; here, to its size (numel). Not the same as ByzFL's / Blades' Gaussian attacks,
    which send fresh N(mu, sigma^2) noise each step, independent of g.
    """

    name = "random_direction"
    reference = "BTARD code ConstantDirection (whole vector instead of per tensor)"
    spec = (
        Param("scale", Real(), 1000.0, "norm of the sent vector, in units of ||g||"),
        Param("seed", Int(), None, "seed of the direction u (null: the run seed)"),
    )

    def __init__(self, params, config, peer):
        super().__init__(params, config, peer)
        self._direction: torch.Tensor | None = None

    def direction(self, g: torch.Tensor, run_seed: int) -> torch.Tensor:
        """The shared unit direction (cached: drawn once per attacker, identical across attackers)."""
        u = self._direction
        if u is None or u.numel() != g.numel() or u.device != g.device or u.dtype != g.dtype:
            seed = run_seed if self.params["seed"] is None else self.params["seed"]
            u = unit_direction(g.numel(), generator(seed, "random_direction"), g)
            self._direction = u
        return u

    def on_gradient(self, g, ctx):
        return self.direction(g, ctx.run_seed) * (float(self.params["scale"]) * g.norm())


@register
class SmallChange(Attack):
    """Send `g + epsilon * ||g|| * u`, u a fresh random unit direction per step and per attacker.

    The stealthy attack: the sent vector is within relative distance `epsilon` (default 0.05) of the true
    gradient, so norm clipping and robust aggregation barely see it, but it no longer matches a recomputation
    of the peer's gradient (BTARD's validators catch it only when they check this peer). u is standard normal,
    normalised, from a generator seeded by (run seed, step, peer): independent across attackers and steps, so
    the perturbations average out rather than collude. Not in the BTARD paper or the peer libraries in this
    form (the closest are ByzFL's / Blades' Gaussian noise attacks, which replace g rather than perturb it).
    """

    name = "small_change"
    reference = "byztrain (stealth test)"
    spec = (Param("epsilon", Real(0), 0.05, "size of the random change, relative to ||g||"),)

    def on_gradient(self, g, ctx):
        u = unit_direction(g.numel(), generator(ctx.run_seed, "small_change", ctx.step, ctx.peer), g)
        return g + u * (float(self.params["epsilon"]) * g.norm())
