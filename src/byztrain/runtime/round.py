"""One step as a defense sees it: who is active, what they send, and how to recompute anyone's gradient."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from byztrain.attacks import Attack, AttackContext
from byztrain.comm import Collective
from byztrain.config import Config
from byztrain.runtime.workload import Workload, public_seed


@dataclass
class History:
    """What a validator needs about the previous step: its parameters and the randomness its seeds used."""

    step: int
    params: torch.Tensor
    shared_random: int
    active: tuple[int, ...]


@dataclass
class Round:
    step: int
    config: Config
    workload: Workload
    comm: Collective
    active: list[int]  # active peers, sorted; fixed for the whole step
    byzantine: frozenset[int]  # Byzantine peers (all, including banned ones)
    attacks: dict[int, Attack]  # Byzantine peer -> its attack instance
    attack_on: bool  # whether the attack window covers this step
    shared_random: int  # r_{t-1}: the previous step's shared randomness
    previous: History | None  # the previous step, for validators
    emit: Callable[..., None]  # emit(type, peer=None, by=None, reason="", **extra) -> events.jsonl
    losses: dict[int, float] = field(default_factory=dict)  # honest peers' training losses this step
    banned_now: dict[int, str] = field(default_factory=dict)  # peer -> reason, banned during this step

    # ---- seeds and contexts -----------------------------------------------------------------
    def seed(self, peer: int, step: int | None = None) -> int:
        if step is None or step == self.step:
            return public_seed(self.config.seed, self.step, peer, self.shared_random)
        if self.previous is not None and step == self.previous.step:
            return public_seed(self.config.seed, step, peer, self.previous.shared_random)
        raise ValueError(f"no seed record for step {step} at step {self.step}")

    def attack(self, peer: int) -> Attack | None:
        """The attack `peer` runs this step, or None when it behaves honestly."""
        if not self.attack_on:
            return None
        return self.attacks.get(peer)

    def context(self, peer: int) -> AttackContext:
        gen = torch.Generator().manual_seed(public_seed(self.config.seed, self.step, -1, 0x5EED))
        return AttackContext(
            step=self.step,
            peer=peer,
            run_seed=self.config.seed,
            byzantine=tuple(p for p in self.active if p in self.byzantine),
            active=tuple(self.active),
            num_classes=self.workload.num_classes,
            shared_generator=gen,
        )

    # ---- gradients --------------------------------------------------------------------------
    def honest_gradient(self, peer: int, step: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Recompute `peer`'s honest gradient at `step` (this one or the previous) from public data."""
        params = None
        if step is not None and step != self.step:
            if self.previous is None or step != self.previous.step:
                raise ValueError(f"cannot recompute step {step} at step {self.step}")
            params = self.previous.params
        with self.workload.parameters_at(params):
            x, y = self.workload.batch(peer, self.seed(peer, step))
            g, _ = self.workload.gradient(x, y, out)
        return g

    def sent_gradients(self, peers: list[int]) -> torch.Tensor:
        """(len(peers), d): what each listed peer sends this step, attacks applied.

        Honest peers (and Byzantine peers outside the attack window) send their true gradient. Omniscient
        attacks see the honest gradients among `peers`.
        """
        out = torch.empty(len(peers), self.workload.dim, device=self.workload.device)
        omniscient: list[tuple[int, Attack]] = []
        honest_rows: list[int] = []
        for row, peer in enumerate(peers):
            attack = self.attack(peer)
            x, y = self.workload.batch(peer, self.seed(peer))
            if attack is None:
                _, loss = self.workload.gradient(x, y, out[row])
                if peer not in self.byzantine:
                    self.losses[peer] = loss
                    honest_rows.append(row)
                elif peer in self.attacks:
                    self.attacks[peer].observe_true_gradient(out[row], self.step)
                continue
            ctx = self.context(peer)
            x, y = attack.on_batch(x, y, ctx)
            g, _ = self.workload.gradient(x, y, out[row])
            attack.observe_true_gradient(g, self.step)
            out[row] = attack.on_gradient(g, ctx)
            if attack.is_omniscient:
                omniscient.append((row, attack))
        if omniscient:
            honest = out[honest_rows]
            honest_peers = tuple(peers[r] for r in honest_rows)
            for row, attack in omniscient:
                ctx = self.context(peers[row])
                ctx.extra["honest_peers"] = honest_peers  # peer id of each row of `honest`
                v = attack.omniscient(honest, ctx)
                if v is not None:
                    out[row] = v
        return out

    # ---- membership -------------------------------------------------------------------------
    def ban(self, peer: int, reason: str, by: int | None = None) -> None:
        if peer in self.banned_now:
            return
        self.banned_now[peer] = reason
        self.emit("ban", peer=peer, by=by, reason=reason)

    def is_banned(self, peer: int) -> bool:
        return peer in self.banned_now
