"""Attacks that use the attacker's own past gradients (`observe_true_gradient` + `on_gradient`)."""

from __future__ import annotations

import torch

from byztrain.attacks.base import Attack, attack_active, register
from byztrain.registry import Choice, Int, Param


@register
class DelayedGradient(Attack):
    """Send the attacker's own *true* gradient from `delay` steps earlier: at attack step t, g_{t - delay}.

    Defaults: `delay` = 1000 (the BTARD ResNet code's `DelayedGradientAttacker`), `warmup` = "oldest".

    Memory: a ring buffer of the needed steps only. `observe_true_gradient` is called every step (attack
    window or not); the gradient of step u is stored (a copy) only if step u + delay is an attack step of
    this run (inside `attack.start/stop/every` and <= `train.steps`), plus, with warmup "oldest", the first
    gradient the peer computes (until it is `delay` steps old). At step t, entries older than t - delay are dropped, and
    the entry of t - delay once sent (or at once if t is not an attack step): the buffer holds at most
    `delay` gradients between steps (`delay` + 1 transiently, between `observe_true_gradient` and
    `on_gradient` of one step), and never more than the number of attack steps in the next `delay` steps
    (+1). E.g. BTARD's ResNet window of 500 attack steps
    keeps at most 501 gradients however large `delay` is; with `attack.every` = 10, about delay / 10.

    Warm-up (no gradient from step t - delay: the run is younger than `delay`, or the peer did not compute
    that step's gradient, e.g. it sat out as a validator): with `warmup` = "oldest" the attacker sends the
    oldest gradient it holds (the stalest it can; before step delay + 1 that is its gradient from its first
    step), and its current true gradient if it holds none; with `warmup` = "honest" it sends its current
    true gradient. BTARD's code instead attacks only while attack_start < step < attack_start + 500 *
    attack_every, i.e. it relies on a full buffer (its runs start from a checkpoint 1000 steps in); set
    `attack.stop` for the same bounded window.
    """

    name = "delayed_gradient"
    reference = "BTARD code DelayedGradientAttacker"
    spec = (
        Param("delay", Int(1), 1000, "steps between computing a gradient and sending it"),
        Param("warmup", Choice(("oldest", "honest")), "oldest", "before a delayed gradient exists: the oldest held, or honest"),
    )

    def __init__(self, params, config, peer):
        super().__init__(params, config, peer)
        self.buffer: dict[int, torch.Tensor] = {}  # step -> true gradient, in increasing step order
        self._seen_any = False

    def _needed(self, step: int) -> bool:
        """Whether the gradient of `step` will be sent: step + delay is an attack step of this run."""
        t = step + int(self.params["delay"])
        return t <= self.config.train.steps and attack_active(self.config, t)

    def observe_true_gradient(self, g, step):
        delay = int(self.params["delay"])
        # Steps before t - delay are never sent again; t - delay itself only if t is an attack step.
        horizon = step - delay if attack_active(self.config, step) else step - delay + 1
        for old in [s for s in self.buffer if s < horizon]:
            del self.buffer[old]
        keep_first = self.params["warmup"] == "oldest" and not self._seen_any
        self._seen_any = True
        if self._needed(step) or keep_first or step in self.buffer:
            self.buffer[step] = g.detach().clone()

    def on_gradient(self, g, ctx):
        target = ctx.step - int(self.params["delay"])
        if target in self.buffer:
            return self.buffer.pop(target)
        if self.params["warmup"] == "oldest" and self.buffer:
            return self.buffer[next(iter(self.buffer))].clone()
        return g
