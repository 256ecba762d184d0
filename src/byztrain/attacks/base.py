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
  expose cheaters. Return True to model non-colluding attackers.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from byztrain.config import Config, ConfigError


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
    #: default parameters; `attack.params` may override only these keys.
    defaults: ClassVar[dict[str, Any]] = {}
    #: defenses this attack makes sense against (None = all). Protocol attacks need "btard".
    requires_defense: ClassVar[tuple[str, ...] | None] = None
    #: whether `omniscient` is implemented (the runtime then passes honest gradients).
    is_omniscient: ClassVar[bool] = False
    #: whether `omniscient`'s vector is the same for every attacker of this class and params (it depends on
    #: the honest gradients and the step's public context only, not on `ctx.peer` or per-peer state): the
    #: runtime then computes it once per step and hands the same vector to all of them.
    shared_craft: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], config: Config, peer: int):
        unknown = set(params) - set(self.defaults)
        if unknown:
            key = sorted(unknown)[0]
            hint = difflib.get_close_matches(key, list(self.defaults), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            accepted = ", ".join(self.defaults) or "none"
            raise ConfigError(
                f"attack.params.{key}", f"unknown parameter for attack {self.name!r}{extra}; accepted: {accepted}"
            )
        self.params = {**self.defaults, **params}
        self.config = config
        self.peer = peer
        self.check_params()

    def check_params(self) -> None:
        """Raise ConfigError for out-of-range parameters (override)."""

    def param_error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"attack.params.{key}", message)

    # ---- gradient / data hooks --------------------------------------------------------------
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


ATTACKS: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    if cls.name in ATTACKS:
        raise ValueError(f"attack {cls.name!r} registered twice")
    ATTACKS[cls.name] = cls
    return cls


def attack_names(name: str) -> list[str]:
    return [n.strip() for n in name.split("+") if n.strip()]


def _lookup(name: str) -> type[Attack]:
    if name not in ATTACKS:
        hint = difflib.get_close_matches(name, list(ATTACKS), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError("attack.name", f"unknown attack {name!r}{extra}; accepted: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def build_attack(config: Config, peer: int) -> Attack | None:
    """The attack instance for Byzantine `peer`, or None for `attack.name: none`."""
    names = attack_names(config.attack.name)
    if names == ["none"] or not names:
        return None
    classes = [_lookup(n) for n in names]
    if len(classes) == 1:
        return classes[0](dict(config.attack.params), config, peer)
    # With several attacks, `attack.params` is a mapping attack-name -> its params.
    params = config.attack.params or {}
    for key in params:
        if key not in names:
            raise ConfigError(
                f"attack.params.{key}",
                f"with a combined attack, params are keyed by attack name; accepted: {', '.join(names)}",
            )
    parts = [cls(dict(params.get(cls.name, {}) or {}), config, peer) for cls in classes]
    return CombinedAttack(parts, config, peer)


def validate_attack(config: Config) -> None:
    names = attack_names(config.attack.name)
    if not names:
        raise ConfigError("attack.name", "must not be empty; use 'none' for no attack")
    for n in names:
        cls = _lookup(n)
        if cls.requires_defense and config.defense.name not in cls.requires_defense:
            raise ConfigError(
                "attack.name",
                f"attack {n!r} attacks the protocol and needs defense.name in {list(cls.requires_defense)}, "
                f"got {config.defense.name!r}",
            )
    if config.byzantine == 0:
        raise ConfigError("byzantine", f"attack {config.attack.name!r} needs byzantine >= 1, got 0")
    build_attack(config, peer=-1)  # parameter checks


def attack_active(config: Config, step: int) -> bool:
    a = config.attack
    if a.name == "none" or step < a.start:
        return False
    if a.stop is not None and step >= a.stop:
        return False
    return (step - a.start) % a.every == 0
