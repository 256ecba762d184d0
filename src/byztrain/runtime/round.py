"""One step as a defense sees it: who is active, what they send, and how to recompute anyone's gradient."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from byztrain.attacks import Attack, AttackContext
from byztrain.comm import Collective
from byztrain.config import Config
from byztrain.protocol.bans import MALFORMED
from byztrain.protocol.mprng import secret_from_key
from byztrain.runtime.workload import Workload, public_seed


class Diverged(RuntimeError):
    """An honest peer's true gradient is not finite: training has diverged (a defense let a huge update through,
    or the learning rate is too high). Not a fault of that peer, so nobody is banned: the run ends here."""

    def __init__(self, step: int, peer: int):
        self.step, self.peer = step, peer
        super().__init__(f"training diverged at step {step}: peer {peer}'s honest gradient is not finite")


@dataclass
class History:
    """What a validator needs about the previous step: its parameters and the randomness its seeds used."""

    step: int
    params: torch.Tensor
    shared_random: int
    active: tuple[int, ...]


class WorkerMomentum:
    """Worker momentum (Karimireddy, He and Jaggi, ICML 2021): peer i sends m_i = beta m_i + g_i, not g_i.

    The buffer takes torch.optim.SGD's form (no dampening; the first buffer is the first gradient), so with
    plain averaging it is the server's momentum moved to the peers: the same update, the same learning rate.
    (Karimireddy et al. write m_i = (1 - beta) g_i + beta m_i, the same direction at (1 - beta) times the
    scale.) A robust rule then compares averages over about 1 / (1 - beta) steps, whose spread across honest
    peers is smaller against their mean than one step's, so an attack sized from that spread (ALIE) shifts
    the aggregate less (docs/results.md, part 1). Holds the buffers of the peers hosted here; a Byzantine
    peer's buffer feeds its attack hooks as its would-be message.
    """

    def __init__(self, beta: float):
        self.beta = beta
        self.buffers: dict[int, torch.Tensor] = {}

    def apply(self, peer: int, g: torch.Tensor) -> None:
        """Fold g into `peer`'s buffer and overwrite g with the buffer: the message `peer` sends."""
        buf = self.buffers.get(peer)
        if buf is None:
            self.buffers[peer] = g.clone()
        else:
            g.copy_(buf.mul_(self.beta).add_(g))


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
    # peers banned at earlier steps for a fault other than silence: Byzantine for certain (honest peers send
    # well-formed messages; a crash is silence)
    convicted: frozenset[int] = frozenset()
    # private MPRNG keys of the peers hosted here; never part of an AttackContext
    peer_keys: Mapping[int, bytes] = field(default_factory=dict, repr=False)
    worker_momentum: WorkerMomentum | None = None  # train.worker_momentum > 0: what peers send is momentum

    # ---- seeds and contexts -----------------------------------------------------------------
    def seed(self, peer: int, step: int | None = None) -> int:
        if step is None or step == self.step:
            return public_seed(self.config.seed, self.step, peer, self.shared_random)
        if self.previous is not None and step == self.previous.step:
            return public_seed(self.config.seed, step, peer, self.previous.shared_random)
        raise ValueError(f"no seed record for step {step} at step {self.step}")

    def mprng_secret(self, peer: int, round_: int, attempt: int) -> bytes:
        """`peer`'s MPRNG secret for round `round_` of aggregation attempt `attempt` of this step, keyed by its
        private key: nobody without the key can predict it (byztrain.protocol.mprng)."""
        key = self.peer_keys.get(peer)
        if key is None:
            raise RuntimeError(f"no MPRNG key for peer {peer} in this process")
        return secret_from_key(key, self.step, round_, attempt)

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
            shared_random=self.shared_random,
        )

    def tamper(self, peer: int, hook: str, honest, *args, extra: dict | None = None):
        """The adversary's one door: what `peer` produces where the honest protocol produces `honest`.

        Honest peers (and Byzantine ones outside the attack window, except for `on_report`) get `honest` back. Otherwise the
        attack's `hook` runs on copies of `args` and the peer's context, and its result is copied too, so a
        hook never holds a tensor the protocol goes on using (a part rewritten in place after its
        commitment, say). A result that breaks the hook's contract becomes MALFORMED: every message check
        rejects it, so the peer is banned for a malformed message and the run goes on.
        """
        # Collusion is not an attack step: Byzantine peers cover for each other whether or not this step
        # attacks (the paper's detection rate assumes only honest validators ever report a cheater).
        attack = self.attacks.get(peer) if hook in _ALWAYS else self.attack(peer)
        if attack is None:
            return honest
        ctx = self.context(peer)
        ctx.extra.update(_copy(extra or {}))
        out = _copy(getattr(attack, hook)(*_copy(args), ctx))
        check = _CONTRACTS.get(hook)
        return out if check is None or check(out, *args) else MALFORMED

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

    def sent_gradients(self, peers: list[int], senders: list[int] | None = None) -> torch.Tensor:
        """(len(peers), d): what each listed peer sends this step, attacks applied.

        SPMD: `peers` are peers hosted by this process (in the simulator, any peers). `senders` are all the
        peers that send a gradient this step (default: `peers`); omniscient attacks see the honest messages
        among them. Honest peers (and Byzantine peers outside the attack window) send their true gradient, or
        with `worker_momentum` their momentum buffer.

        When some senders live in other processes (the distributed runtime) and an omniscient attack is on,
        every process hosting an honest sender passes its true gradient to the processes hosting the
        omniscient attackers (one all-to-all, not counted in the byte accounting). This models an omniscient
        adversary -- one that sees every honest gradient of the step, as these attacks assume -- and is not
        a message of the protocol: honest processes know who the attackers are only to play that part. With
        every sender local (the simulator) no message is exchanged and the result is what it always was.
        """
        senders = list(peers) if senders is None else list(senders)
        out = torch.empty(len(peers), self.workload.dim, device=self.workload.device)
        omniscient: list[tuple[int, Attack]] = []
        honest_rows: list[int] = []
        for row, peer in enumerate(peers):
            attack = self.attack(peer)
            x, y = self.workload.batch(peer, self.seed(peer))
            if attack is None:
                _, loss = self.workload.gradient(x, y, out[row])
                # The sum is not finite iff an entry is not (or they overflow float: diverged too), and costs
                # a twentieth of an elementwise isfinite pass.
                if peer not in self.byzantine and not (math.isfinite(loss) and math.isfinite(out[row].sum().item())):
                    raise Diverged(self.step, peer)
                if peer not in self.byzantine:
                    self.losses[peer] = loss
                    honest_rows.append(row)
                elif peer in self.attacks:
                    self.attacks[peer].observe_true_gradient(out[row].clone(), self.step)
                if self.worker_momentum is not None:
                    self.worker_momentum.apply(peer, out[row])
                continue
            batch = self.tamper(peer, "on_batch", (x, y), x, y)
            if batch is MALFORMED:
                out[row].fill_(math.nan)  # non-finite parts: its receivers ban it with the part as evidence
                continue
            g, _ = self.workload.gradient(*batch, out[row])
            attack.observe_true_gradient(g.clone(), self.step)
            if self.worker_momentum is not None:
                self.worker_momentum.apply(peer, g)
            sent = self.tamper(peer, "on_gradient", g, g)
            if sent is MALFORMED:
                out[row].fill_(math.nan)
                continue
            out[row] = sent
            if attack.is_omniscient:
                omniscient.append((row, attack))
        if set(senders) <= set(peers):
            if omniscient:
                honest = out[honest_rows]
                honest_peers = tuple(peers[r] for r in honest_rows)
                self._craft(omniscient, peers, honest, honest_peers, out)
            return out
        # Some senders are remote: the adversary's view of the honest gradients comes over the network.
        crafters = [p for p in senders if self._is_omniscient(p)]
        if not crafters:
            return out
        mine = {peers[r]: out[r] for r in honest_rows}
        outgoing = {p: {c: g for c in crafters if c != p} for p, g in mine.items()}
        for p in peers:
            outgoing.setdefault(p, {})
        with self.comm.unaccounted():
            incoming = self.comm.all_to_all(outgoing, senders)
        for row, attack in omniscient:
            inbox = incoming.get(peers[row], {})
            seen = [(p, mine[p] if p in mine else inbox.get(p)) for p in senders if p not in self.byzantine]
            seen = [(p, g) for p, g in seen if _is_vector(g, self.workload.dim)]  # crashed senders: absent
            honest = torch.stack([g.to(out.device) for _, g in seen]) if seen else out.new_empty(0, out.shape[1])
            self._craft([(row, attack)], peers, honest, tuple(p for p, _ in seen), out)
        return out

    def _is_omniscient(self, peer: int) -> bool:
        """Whether `peer` runs an omniscient attack this step (public in this model: see sent_gradients)."""
        attack = self.attack(peer)
        return attack is not None and bool(attack.is_omniscient)

    def _craft(self, omniscient, peers, honest, honest_peers, out) -> None:
        shared: dict[tuple, torch.Tensor | None] = {}  # one vector per (class, params) for shared_craft
        for row, attack in omniscient:
            key = (type(attack), repr(sorted(attack.params.items()))) if attack.shared_craft else None
            if key is not None and key in shared:
                v = shared[key]
            else:
                v = self.tamper(peers[row], "omniscient", None, honest, extra={"honest_peers": honest_peers})
                if key is not None:
                    shared[key] = v
            if v is MALFORMED:
                out[row].fill_(math.nan)
            elif v is not None:
                out[row] = v

    def gather_sent_gradients(self, peers: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
        """SPMD: every peer's sent gradient, exchanged through `comm` (a trusted-server baseline's input).

        Returns (senders, (len(senders), d)) in the order of `peers` (default: the active peers). A peer
        whose gradient does not arrive (crashed, timed out), is not a d-vector or holds a NaN is banned as
        silent / malformed and left out; in the simulator every peer is local and all of them send.
        """
        peers = list(self.active if peers is None else peers)
        local = set(self.comm.local_peers)
        mine = [p for p in peers if p in local]
        rows = self.sent_gradients(mine, senders=peers)
        got = self.comm.all_gather({p: rows[i] for i, p in enumerate(mine)}, peers)
        if len(mine) == len(peers):  # everyone local: the rows are already in order
            return self._without_nan(peers, rows)
        senders = []
        for p in peers:
            v = got.get(p)
            if v is None:
                self.ban(p, "silent: sent no gradient")
            elif not _is_vector(v, self.workload.dim):
                self.ban(p, "malformed gradient")
            else:
                senders.append(p)
        if not senders:
            return [], rows.new_empty(0, self.workload.dim)
        return self._without_nan(senders, torch.stack([got[p].to(rows.device) for p in senders]))

    def _without_nan(self, senders: list[int], rows: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Ban the senders of rows holding a NaN (no gradient has one: an honest peer's would have stopped
        the run as diverged) and drop those rows; the rules reject NaN. +-inf stays: a baseline rule sees
        an infinite message as it is (the `inf` attack)."""
        # A NaN entry makes the row's sum NaN, at a twentieth of the cost of an elementwise pass; so do
        # +inf and -inf together, hence the exact check on the few suspects.
        suspects = torch.isnan(rows.sum(dim=1)).nonzero().flatten().tolist()
        bad = {i for i in suspects if torch.isnan(rows[i]).any()}
        if not bad:
            return senders, rows
        for i in sorted(bad):
            self.ban(senders[i], "malformed gradient: NaN")
        keep = [i for i in range(len(senders)) if i not in bad]
        return [senders[i] for i in keep], rows[keep]

    # ---- membership -------------------------------------------------------------------------
    def ban(self, peer: int, reason: str, by: int | None = None) -> None:
        if peer in self.banned_now:
            return
        self.banned_now[peer] = reason
        self.emit("ban", peer=peer, by=by, reason=reason)

    def is_banned(self, peer: int) -> bool:
        return peer in self.banned_now


def _copy(obj):
    """A deep copy of the tensors in `obj` (through dicts, lists and tuples); other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj


def _same_batch(out, x, y) -> bool:
    return (
        isinstance(out, tuple)
        and len(out) == 2
        and all(isinstance(t, torch.Tensor) for t in out)
        and out[0].shape == x.shape
        and out[0].dtype == x.dtype
        and out[1].shape == y.shape
        and out[1].dtype == y.dtype
    )


def _gradient_like(out, g) -> bool:
    return isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == g.shape


#: Per hook, what a result must be (values that receivers check on the wire anyway are not repeated here).
#: hooks a Byzantine peer runs at every step, not only inside the attack window
_ALWAYS = frozenset({"on_report"})

_CONTRACTS = {
    "on_batch": _same_batch,
    "on_gradient": _gradient_like,
    "omniscient": lambda out, honest: out is None or (
        isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == honest.shape[1:]
    ),
    "on_send_parts": lambda out, parts: out is None or isinstance(out, dict),
    "accusations": lambda out: isinstance(out, (list, tuple)),
    "on_report": lambda out, target, reason: isinstance(out, bool),
}


def _is_vector(v, dim: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.shape == (dim,)
