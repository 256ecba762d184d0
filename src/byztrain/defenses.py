"""Defenses: what turns the peers' messages of one step into one update.

A defense sees a `Round` (byztrain.runtime.round) — the step's active peers, their sent gradients, the
ability to recompute anyone's honest gradient from public seeds, the event log — and returns a
`StepResult`. Baselines aggregate full vectors as a trusted parameter server would (no verification, no
bans); BTARD runs the protocol (byztrain.protocol.btard).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from byztrain.config import Config, ConfigError

if TYPE_CHECKING:
    from byztrain.runtime.round import Round


@dataclass
class StepResult:
    update: torch.Tensor  # the aggregated gradient (d,), identical on every honest peer
    stats: dict[str, float] = field(default_factory=dict)  # logged to metrics.jsonl
    shared_random: int | None = None  # r_t when the defense produces shared randomness (BTARD's MPRNG)


class Defense:
    name = "abstract"

    def __init__(self, config: Config):
        self.config = config

    def step(self, rnd: Round) -> StepResult:
        raise NotImplementedError


class AggregatorDefense(Defense):
    """A trusted-server baseline: optional pre-aggregators, then one robust rule over the full vectors."""

    def __init__(self, config: Config):
        super().__init__(config)
        from byztrain import aggregators

        d = config.defense
        self.f = config.byzantine if d.f is None else d.f
        self._generator = torch.Generator().manual_seed(config.seed + 7_919)
        self.pre = [
            aggregators.build_pre_aggregator(p, f=self.f, params=d.params, generator=self._generator) for p in d.pre
        ]
        params = dict(d.params)
        if d.name == "cclip_ps" and "iters" not in params:
            # One place for CenteredClip's stopping rule: defense.cclip_tol / cclip_max_iters.
            params.setdefault("tol", d.cclip_tol)
            params.setdefault("max_iters", d.cclip_max_iters)
        self.aggregate: Callable = aggregators.build_aggregator(
            d.name, f=self.f, tau=d.tau, params=params, n=self._n_after_pre(config.peers), generator=self._generator
        )
        self.name = d.name

    def _n_after_pre(self, n: int) -> int:
        for p in self.pre:
            n = p.output_rows(n)
        return n

    def step(self, rnd: Round) -> StepResult:
        # SPMD: each process computes its own peers' gradients; the server's input is their all-gather
        # (in the simulator: every peer is local, the same (n, d) tensor as before, bitwise).
        _, grads = rnd.gather_sent_gradients()
        for pre in self.pre:
            grads = pre(grads)
        update = self.aggregate(grads)
        stats = {f"agg_{k}": float(v) for k, v in (self.aggregate.last_stats or {}).items()
                 if isinstance(v, (int, float, bool)) or getattr(v, "numel", lambda: 0)() == 1}
        return StepResult(update, stats)


class MeanDefense(Defense):
    """Plain averaging (no defense). Kept dependency-free: it is the reference every ratio is measured against."""

    name = "mean"

    def step(self, rnd: Round) -> StepResult:
        _, grads = rnd.gather_sent_gradients()  # SPMD, as in AggregatorDefense
        return StepResult(grads.mean(dim=0))


def _baseline_names() -> list[str]:
    try:
        from byztrain.aggregators import AGGREGATORS
    except ImportError:  # aggregators module not present yet
        return []
    return [n for n in AGGREGATORS if n != "mean"]


def defense_names() -> list[str]:
    return ["mean", "btard", *_baseline_names()]


def validate_defense(config: Config) -> None:
    name = config.defense.name
    names = defense_names()
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError("defense.name", f"unknown defense {name!r}{extra}; accepted: {', '.join(names)}")
    if name == "btard":
        if 2 * config.byzantine >= config.peers:
            raise ConfigError(
                "byzantine",
                f"btard tolerates fewer than half Byzantine peers: need byzantine < peers/2 "
                f"({config.peers}/2), got {config.byzantine}",
            )
        workers = config.peers - config.defense.validators
        if 2 * config.byzantine >= workers:
            # Validators sit out the aggregation, so in the worst case every Byzantine peer aggregates
            # among `peers - validators` workers. At half or more, CenteredClip has no honest majority
            # and stops converging, and the fixed-point check then convicts honest aggregators.
            raise ConfigError(
                "byzantine",
                f"btard needs byzantine < (peers - defense.validators)/2 = ({config.peers} - "
                f"{config.defense.validators})/2, got {config.byzantine}: lower byzantine or validators, "
                f"or add peers",
            )
        if config.defense.validators >= config.peers - 1:
            raise ConfigError(
                "defense.validators",
                f"must be < peers - 1 ({config.peers - 1}) so someone still aggregates, "
                f"got {config.defense.validators}",
            )
        if config.defense.pre:
            raise ConfigError("defense.pre", "btard takes no pre-aggregators (it clips per partition)")
    elif name != "mean":
        build_defense(config)  # checks the rule's preconditions (e.g. Krum's n >= 2f + 3) up front
    elif config.defense.pre:
        build_defense(config)


def build_defense(config: Config) -> Defense:
    name = config.defense.name
    if name == "btard":
        from byztrain.protocol.btard import BtardDefense

        return BtardDefense(config)
    if name == "mean" and not config.defense.pre:
        return MeanDefense(config)
    try:
        return AggregatorDefense(config)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("defense", str(exc)) from None
