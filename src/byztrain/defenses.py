"""Defenses: what turns the peers' messages of one step into one update.

A defense sees a `Round` (byztrain.runtime.round) — the step's active peers, their sent gradients, the
ability to recompute anyone's honest gradient from public seeds, the event log — and returns a
`StepResult`. Baselines aggregate full vectors as a trusted parameter server would (no verification, no
bans); BTARD runs the protocol (byztrain.protocol.btard). Each registers in `byztrain.registry.DEFENSES`:
the trusted server here (for every rule in AGGREGATORS), btard in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from byztrain.config import Config
from byztrain.errors import ConfigError
from byztrain.registry import DEFENSES, SERVER, Entry, defense_entry
from byztrain.rules import BoundAggregator, BoundPreAggregator, build_aggregator, build_pre_aggregator
from byztrain.runtime import majority

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


def told_f(config: Config) -> int:
    """The Byzantine inputs a baseline rule is told to tolerate: defense.f, else the run's byzantine."""
    return config.byzantine if config.defense.f is None else config.defense.f


def server_pipeline(
    config: Config, n: int, generator: torch.Generator, f: int | None = None
) -> tuple[list[BoundPreAggregator], BoundAggregator]:
    """defense.pre and the rule defense.name bound for ``n`` input rows and ``f`` Byzantine ones among them
    (default: told_f), every precondition checked."""
    d = config.defense
    f = told_f(config) if f is None else f
    pre = []
    for name in d.pre:
        pre.append(build_pre_aggregator(name, f=f, params=d.params, generator=generator, n=n))
        n = pre[-1].output_rows(n)
    params = dict(d.params)
    if d.name == "cclip_ps" and "iters" not in params:
        # One place for CenteredClip's stopping rule: defense.cclip_tol / cclip_max_iters.
        params.setdefault("tol", d.cclip_tol)
        params.setdefault("max_iters", d.cclip_max_iters)
    return pre, build_aggregator(d.name, f=f, tau=d.tau, params=params, n=n, generator=generator)


class AggregatorDefense(Defense):
    """A trusted-server baseline: optional pre-aggregators, then one robust rule over the full vectors.

    The rule is bound for the rows that arrive and the Byzantine peers that may be among them: f less the
    peers convicted of a malformed message (Byzantine for certain). A peer gone silent may have crashed
    honestly, so f stays; when the rule's precondition then fails, the run stops here."""

    def __init__(self, config: Config):
        super().__init__(config)
        self._generator = torch.Generator().manual_seed(config.seed + 7_919)
        self._f = told_f(config)
        self.pre, self.aggregate = server_pipeline(config, config.peers, self._generator)
        self._pipelines = {(config.peers, self._f): (self.pre, self.aggregate)}
        self.name = config.defense.name

    def _pipeline(self, rows: int, convicted: int) -> tuple[list[BoundPreAggregator], BoundAggregator]:
        f = max(0, self._f - convicted)
        if (rows, f) not in self._pipelines:
            try:
                pre, rule = server_pipeline(self.config, rows, self._generator, f=f)
            except ValueError as exc:
                raise RuntimeError(
                    f"defense {self.name!r} cannot aggregate the {rows} peers left with f={f}: {exc}"
                ) from None
            if self.aggregate.stateful:
                rule.carry_state(self.aggregate)
            self._pipelines[rows, f] = pre, rule
        self.pre, self.aggregate = self._pipelines[rows, f]
        return self.pre, self.aggregate

    def step(self, rnd: Round) -> StepResult:
        # SPMD: each process computes its own peers' gradients; the server's input is their all-gather
        # (in the simulator: every peer is local, the same (n, d) tensor as before, bitwise).
        _, grads = rnd.gather_sent_gradients()
        convicted = rnd.convicted | {p for p, why in rnd.banned_now.items() if not majority.is_silence(why)}
        pre_aggregators, aggregate = self._pipeline(grads.shape[0], len(convicted))
        for pre in pre_aggregators:
            grads = pre(grads)
        update = aggregate(grads)
        stats = {f"agg_{k}": float(v) for k, v in (aggregate.last_stats or {}).items()
                 if isinstance(v, (int, float, bool)) or getattr(v, "numel", lambda: 0)() == 1}
        return StepResult(update, stats)


class MeanDefense(Defense):
    """Plain averaging (no defense). Kept dependency-free: it is the reference every ratio is measured against."""

    name = "mean"

    def step(self, rnd: Round) -> StepResult:
        _, grads = rnd.gather_sent_gradients()  # SPMD, as in AggregatorDefense
        return StepResult(grads.mean(dim=0))


def _build_server(config: Config) -> Defense:
    if config.defense.name == "mean" and not config.defense.pre:
        return MeanDefense(config)
    try:
        return AggregatorDefense(config)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("defense", str(exc)) from None


DEFENSES.add(
    Entry(
        SERVER,
        "a trusted parameter server: defense.pre, then the rule defense.name over the step's full gradients",
        obj=_build_server,
        check=_build_server,  # building binds every parameter and checks every precondition
        preconditions="those of the rule and its pre-aggregators",
    )
)


def validate_defense(config: Config) -> None:
    defense_entry(config.defense.name).check(config)


def build_defense(config: Config) -> Defense:
    return defense_entry(config.defense.name).obj(config)
