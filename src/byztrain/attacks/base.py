"""The attack hook interface and registry.

An attack is a class registered under a name (`attack.name` in the config). Every Byzantine peer gets its
own instance (so per-attacker state such as a delayed-gradient ring buffer stays per attacker); colluding
attackers coordinate through `ctx.shared_generator`, which is seeded identically for all of them at a step.

Hooks are all optional; the defaults behave honestly. The runtime calls them only while the attack is
active (`attack.start <= step`, `step < attack.stop` if set, `(step - start) % every == 0`); outside that
window a Byzantine peer behaves exactly like an honest one. Steps are numbered from 1.

Gradient/data hooks (every defense):
- `on_batch(x, y, ctx)` -> (x, y): data poisoning before the gradient is computed.
- `on_gradient(g, ctx)` -> g: what the peer sends instead of its (possibly poisoned) gradient `g`.
- `omniscient(honest, ctx)` -> vector or None: attacks that need this step's honest gradients (IPM, ALIE,
  Min-Max); called after all honest gradients exist, `honest` is an (h, d) tensor. Returning None keeps the
  value produced by `on_gradient`.

Every hook is called through `Round.tamper`: it receives copies (never a tensor the protocol goes on using)
and its result is copied and checked against the hook's contract; a result that breaks it (a wrong shape or
dtype, None where a value is due, an accusation that is not a (peer, reason) pair, ...) becomes a malformed
message and its peer is banned. A hook receives only what is public at that moment or its own.

Protocol hooks (BTARD only; see byztrain.protocol):
- `on_send_parts(parts, ctx)` -> dict receiver -> part, or None to send nothing (silent).
- `on_aggregate(partition, value, ctx)` -> the aggregated part this peer publishes as aggregator.
- `on_check_scalars(s, d, ctx)` -> (s, d): the random-projection scalars this peer broadcasts. An aggregator
  also finds in `ctx.extra` what it holds of its partition: "partition" (its index), "row" (its own row),
  "partition_rows" (the (n, k) parts it received), "aggregate" (the published ĝ[j]) and "z" (the q public
  directions restricted to the partition).
- `on_mprng_reveal(secret, ctx)` -> bytes or None: the MPRNG reveal (None withholds it).
- `accusations(ctx)` -> list of (target peer, reason): false accusations this peer raises.
- `on_report(target, reason, ctx)` -> bool: whether to raise an accusation the honest protocol calls for
  (a validator whose target's recomputation mismatches, an aggregator that caught a liar in the check
  scalars). Default: collude, i.e. never report a fellow Byzantine peer (`ctx.byzantine`), report anyone
  else. This is the adversary the paper's detection rate (1/n)((n-b)/n) assumes: only honest validators
  expose cheaters. Unlike the other hooks it runs at every step, inside the attack window or not:
  collusion is not an attack step. Return True to model non-colluding attackers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from byztrain.config import Config, attack_parts
from byztrain.errors import ConfigError
from byztrain.registry import ATTACKS, Entry, Param, bind_params


@dataclass
class AttackContext:
    step: int
    peer: int
    run_seed: int
    byzantine: tuple[int, ...]  # all Byzantine peers still active
    active: tuple[int, ...]  # all active peers (honest and Byzantine)
    num_classes: int
    shared_generator: torch.Generator  # same seed for every attacker at this step: collusion
    shared_random: int = 0  # r_{t-1}, the previous step's public shared randomness (step t's seeds, validators)
    extra: dict[str, Any] = field(default_factory=dict)


class Attack:
    """Base class: an honest peer. Subclasses override the hooks they need."""

    name: ClassVar[str] = "none"
    #: the parameters `attack.params` may set (name, kind, default, meaning)
    spec: ClassVar[tuple[Param, ...]] = ()
    #: the paper or library whose attack this is ("" when it is byztrain's own)
    reference: ClassVar[str] = ""
    #: defenses this attack makes sense against (None = all). Protocol attacks need "btard".
    requires_defense: ClassVar[tuple[str, ...] | None] = None
    #: whether `omniscient` is implemented (the runtime then passes the honest peers' messages).
    is_omniscient: ClassVar[bool] = False
    #: whether `omniscient`'s vector is the same for every attacker of this class and params (it depends on
    #: the honest gradients and the step's public context only, not on `ctx.peer` or per-peer state): the
    #: runtime then computes it once per step and hands the same vector to all of them.
    shared_craft: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], config: Config, peer: int):
        self.params = bind_params(self.name, self.spec, params, "attack.params")
        self.config = config
        self.peer = peer
        self.check_params()

    def check_params(self) -> None:
        """Raise ConfigError for what the parameter kinds in `spec` cannot say (override)."""

    def param_error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"attack.params.{key}", message)

    # ---- gradient / data hooks --------------------------------------------------------------
    # `g` in on_gradient and the rows of `honest` in omniscient are what the peers would send: gradients, or
    # with train.worker_momentum their momentum buffers; observe_true_gradient always gets the gradient.
    def on_batch(self, x: torch.Tensor, y: torch.Tensor, ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def on_gradient(self, g: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return g

    def omniscient(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor | None:
        return None

    def observe_true_gradient(self, g: torch.Tensor, step: int) -> None:
        """Called every step (attack active or not) with the peer's honest gradient; for temporal attacks."""

    # ---- protocol hooks (BTARD) -------------------------------------------------------------
    def on_send_parts(self, parts: dict[int, torch.Tensor], ctx: AttackContext) -> dict[int, torch.Tensor] | None:
        return parts

    def on_aggregate(self, partition: int, value: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return value

    def on_check_scalars(
        self, s: torch.Tensor, d: torch.Tensor, ctx: AttackContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return s, d

    def on_mprng_reveal(self, secret: bytes, ctx: AttackContext) -> bytes | None:
        return secret

    def accusations(self, ctx: AttackContext) -> list[tuple[int, str]]:
        return []

    def on_report(self, target: int, reason: str, ctx: AttackContext) -> bool:
        return target not in ctx.byzantine

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class CombinedAttack(Attack):
    """Several attacks at once (`attack.name: "sign_flip+false_accusation"`): each hook chains through them."""

    name = "combined"

    def __init__(self, parts: list[Attack], config: Config, peer: int):
        self.parts = parts
        self.params = {p.name: p.params for p in parts}
        self.config = config
        self.peer = peer
        self.is_omniscient = any(p.is_omniscient for p in parts)

    def on_batch(self, x, y, ctx):
        for p in self.parts:
            x, y = p.on_batch(x, y, ctx)
        return x, y

    def on_gradient(self, g, ctx):
        for p in self.parts:
            g = p.on_gradient(g, ctx)
        return g

    def omniscient(self, honest, ctx):
        out = None
        for p in self.parts:
            v = p.omniscient(honest, ctx)
            out = v if v is not None else out
        return out

    def observe_true_gradient(self, g, step):
        for p in self.parts:
            p.observe_true_gradient(g, step)

    def on_send_parts(self, parts, ctx):
        for p in self.parts:
            if parts is None:
                return None
            parts = p.on_send_parts(parts, ctx)
        return parts

    def on_aggregate(self, partition, value, ctx):
        for p in self.parts:
            value = p.on_aggregate(partition, value, ctx)
        return value

    def on_check_scalars(self, s, d, ctx):
        for p in self.parts:
            s, d = p.on_check_scalars(s, d, ctx)
        return s, d

    def on_mprng_reveal(self, secret, ctx):
        for p in self.parts:
            if secret is None:
                return None
            secret = p.on_mprng_reveal(secret, ctx)
        return secret

    def accusations(self, ctx):
        return [a for p in self.parts for a in p.accusations(ctx)]

    def on_report(self, target, reason, ctx):
        return all(p.on_report(target, reason, ctx) for p in self.parts)


#: the hooks an attack may override, in the order a step calls them
HOOKS = (
    "on_batch", "on_gradient", "observe_true_gradient", "omniscient", "on_send_parts", "on_aggregate",
    "on_check_scalars", "on_mprng_reveal", "accusations", "on_report",
)


def _check(cls: type[Attack], config: Config, params: dict) -> None:
    """The registry check: the attack fits the defense, and its parameters are valid."""
    if cls.requires_defense and config.defense.name not in cls.requires_defense:
        raise ConfigError(
            "attack.name",
            f"attack {cls.name!r} attacks the protocol and needs defense.name in {list(cls.requires_defense)}, "
            f"got {config.defense.name!r}",
        )
    cls(dict(params), config, peer=-1)


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add the attack to the registry under ``cls.name``."""
    doc = (cls.__doc__ or "").strip()
    ATTACKS.add(
        Entry(
            cls.name,
            " ".join(doc.split("\n\n")[0].split()),
            obj=cls,
            params=cls.spec,
            preconditions="defense.name: btard" if cls.requires_defense else "",
            check=functools.partial(_check, cls),
            reference=cls.reference,
            extra={"hooks": [h for h in HOOKS if getattr(cls, h) is not getattr(Attack, h)]},
        )
    )
    return cls


def build_attack(config: Config, peer: int) -> Attack | None:
    """The attack instance for Byzantine `peer`, or None for `attack.name: none`."""
    parts = [ATTACKS.lookup(name).obj(params, config, peer) for name, params in attack_parts(config)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else CombinedAttack(parts, config, peer)


def attack_active(config: Config, step: int) -> bool:
    a = config.attack
    if a.name == "none" or step < a.start:
        return False
    if a.stop is not None and step >= a.stop:
        return False
    return (step - a.start) % a.every == 0
