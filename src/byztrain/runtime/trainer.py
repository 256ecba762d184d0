"""The training loop shared by both runtimes: rounds, defense, optimizer, evaluation, logging, checkpoints.

A runtime differs only in its Collective and in which peers it hosts; the step logic is here once. The
distributed runtime subclasses Trainer only to gather telemetry (losses, bytes, events) to its writer, to
stop a process whose peer was banned, and to route checkpoint files through rank 0 (runtime/distributed.py).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable

import torch

from byztrain.attacks import Attack, attack_active, build_attack
from byztrain.comm import Collective, LocalCollective
from byztrain.config import Config
from byztrain.defenses import Defense, build_defense
from byztrain.protocol.mprng import KEY_BYTES, peer_key
from byztrain.runtime import checkpoint as ckpt
from byztrain.runtime import majority
from byztrain.runtime.outputs import RunWriter
from byztrain.runtime.progress import progress_bar
from byztrain.runtime.round import Diverged, History, Round, WorkerMomentum
from byztrain.runtime.workload import Workload, public_seed


def choose_byzantine(config: Config) -> list[int]:
    """Byzantine peers drawn from the run seed; peer 0 (which evaluates and logs) always stays honest."""
    rng = random.Random(config.seed)
    return sorted(rng.sample(range(1, config.peers), config.byzantine))


def lr_at(config: Config, step: int) -> float:
    """Learning rate for step `step` (1-based)."""
    t = config.train
    if t.schedule == "cosine":
        horizon = t.schedule_steps or t.steps
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / horizon))
    return t.lr


class Trainer:
    def __init__(
        self,
        config: Config,
        *,
        comm: Collective | None = None,
        writer: RunWriter | None = None,
        progress: bool = True,
        secret_key: bytes | None = None,
    ):
        """`secret_key`: the run's 32-byte MPRNG master key (the runtimes pass the run folder's key file);
        None draws one from os.urandom, so such a run's shared randomness does not replay."""
        if secret_key is None:
            secret_key = os.urandom(KEY_BYTES)
        if not isinstance(secret_key, (bytes, bytearray)) or len(secret_key) != KEY_BYTES:
            raise ValueError(f"secret_key must be {KEY_BYTES} bytes, got {type(secret_key).__name__}")
        self.config = config
        self.device = torch.device(config.runtime.device)
        self.workload = Workload(config, self.device)
        self.comm = comm or LocalCollective(list(range(config.peers)))
        # only the hosted peers' keys are kept (a deployment peer holds its own key, nobody else's)
        self._peer_keys = {p: peer_key(secret_key, p) for p in self.comm.local_peers}
        self.writer = writer
        self.progress = progress
        self.byzantine = choose_byzantine(config)
        self.attacks: dict[int, Attack] = {}
        for p in self.byzantine:
            a = build_attack(config, p)
            if a is not None:
                self.attacks[p] = a
        self.defense: Defense = build_defense(config)
        self.active = list(range(config.peers))
        self.banned: dict[int, int] = {}  # peer -> step of the ban
        self.silent_bans: set[int] = set()  # banned for silence (a crash in the distributed runtime)
        self.majority_lost: dict | None = None  # set when the run must stop (runtime/majority.py)
        self.diverged_at: int | None = None  # the step whose honest gradients were not finite
        self.shared_random = public_seed(config.seed, 0, -1, 0)  # r_0, before any MPRNG ran
        self.previous: History | None = None
        self.keep_history = getattr(self.defense, "needs_history", False)

        self.flat_grad = torch.zeros(self.workload.dim, device=self.device)
        offset = 0
        for p in self.workload.params:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        t = config.train
        self.optimizer = torch.optim.SGD(
            self.workload.params,
            lr=t.lr,
            momentum=t.momentum,
            nesterov=t.nesterov,
            weight_decay=t.weight_decay,
        )
        self.worker_momentum = WorkerMomentum(t.worker_momentum) if t.worker_momentum > 0 else None
        self.step = 0
        self.test_accuracy: float | None = None
        self.best_accuracy: float | None = None
        self.evaluates = True  # the distributed runtime evaluates on the writer (rank 0) only
        self.checkpoint_every = ckpt.checkpoint_every(config)
        self.final_checkpoint = self.checkpoint_every > 0
        self.elapsed_before = 0.0  # seconds run before a resume
        # per-step telemetry until the logging window is merged: step -> {peer: loss} / traffic record
        self._window: list[dict] = []
        self._losses: dict[int, dict[int, float]] = {}
        self._traffic: dict[int, dict] = {}

    # ---- events --------------------------------------------------------------------------------
    def _emit(self, type: str, peer: int | None = None, by: int | None = None, reason: str = "", **extra) -> None:
        if self.writer is not None:
            self.writer.event({"step": self.step, "type": type, "peer": peer, "by": by, "reason": reason, **extra})

    # ---- one step ------------------------------------------------------------------------------
    def make_round(self, step: int) -> Round:
        """The Round of `step` as every peer sees it from the current state (no side effects)."""
        return Round(
            step=step,
            config=self.config,
            workload=self.workload,
            comm=self.comm,
            active=list(self.active),
            byzantine=frozenset(self.byzantine),
            attacks=self.attacks,
            attack_on=attack_active(self.config, step),
            shared_random=self.shared_random,
            previous=self.previous,
            emit=self._emit,
            peer_keys=self._peer_keys,
            worker_momentum=self.worker_momentum,
            convicted=frozenset(p for p in self.banned if p not in self.silent_bans),
        )

    def train_step(self) -> dict:
        self.step += 1
        step = self.step
        rnd = self.make_round(step)
        params_before = self.workload.flat_params.clone() if self.keep_history else None
        result = self.defense.step(rnd)
        update = result.update
        if not torch.isfinite(update).all():
            # Cannot happen with a sound defense; with `mean` an attacker can send Inf. Skip rather than
            # poison the parameters, and say so.
            self._emit("update_skipped", reason="non-finite aggregate")
            update = torch.zeros_like(update)
        self.flat_grad.copy_(update)
        update_norm = update.norm().item()  # logged, and the clip's input
        clip = self.config.train.clip_norm
        if clip is not None and update_norm > clip:
            self.flat_grad.mul_(clip / update_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.config, step)
        self.optimizer.step()

        if self.keep_history:
            self.previous = History(step, params_before, self.shared_random, tuple(rnd.active))
        if result.shared_random is not None:
            self.shared_random = result.shared_random
        else:
            self.shared_random = public_seed(self.config.seed, step, -1, 0)
        for peer, reason in rnd.banned_now.items():
            if peer in self.active:
                self.active.remove(peer)
                self.banned[peer] = step
                if majority.is_silence(reason):
                    self.silent_bans.add(peer)
        if rnd.banned_now and self.majority_lost is None:
            self.majority_lost = self._check_majority()
            if self.majority_lost is not None:
                self._emit("majority_lost", **self.majority_lost)

        sent, received = self.comm.take_byte_counts()
        local = [p for p in self.comm.local_peers if p in rnd.active]  # an explicit 0 is a count, absence is not
        self._traffic[step] = {
            "active": list(rnd.active),
            "sent": {p: sent.get(p, 0) for p in local},
            "received": {p: received.get(p, 0) for p in local},
        }
        self._losses[step] = dict(rnd.losses)
        losses = list(rnd.losses.values())
        record = {
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": lr_at(self.config, step),
            "update_norm": update_norm,
        }
        record.update(result.stats)
        return record

    def evaluate(self) -> dict:
        if not self.evaluates:
            return {}
        loss, acc = self.workload.evaluate()
        self.test_accuracy = acc
        self.best_accuracy = acc if self.best_accuracy is None else max(self.best_accuracy, acc)
        return {"test_loss": loss, "test_accuracy": acc}

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        cfg = self.config
        lost = self._check_majority()  # a resumed run that had stopped for this stops again at once
        if lost is not None:
            raise majority.HonestMajorityLost(self._lost_message(lost))
        started = time.perf_counter() - self.elapsed_before
        bar = None
        if self.progress:
            bar = progress_bar(cfg.train.steps, initial=self.step, desc=cfg.name, unit="step")
        if self.step == 0:
            self._log({"step": 0, **self.evaluate(), "active_peers": len(self.active), "banned": []}, started)
        while self.step < cfg.train.steps:
            try:
                record = self.train_step()
            except Diverged as exc:
                self._stop_diverged(exc, started)
                break
            self._window.append(record)
            step = self.step
            self._after_step()
            if self.majority_lost is not None:
                if bar is not None:
                    bar.close()
                self._stop_majority_lost(started)
            is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
            is_log = step % cfg.log.every == 0 or is_eval
            is_ckpt = self._checkpoint_due(step)
            if is_log or is_ckpt:
                self._sync()
            if is_log:
                merged = self._log_window(started, evaluate=is_eval)
                if bar is not None:
                    post = {"loss": f"{merged.get('train_loss', float('nan')):.3f}"}
                    if self.test_accuracy is not None:
                        post["acc"] = f"{self.test_accuracy:.3f}"
                    post["banned"] = len(self.banned)
                    bar.set_postfix(post, refresh=False)
            if is_ckpt:
                self.save_checkpoint(time.perf_counter() - started)
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step)
        if bar is not None:
            bar.close()
        return self.summary(time.perf_counter() - started)

    def _log_window(self, started: float, evaluate: bool = False) -> dict:
        merged = self._merge_window()
        merged["step"] = self.step
        merged["active_peers"] = len(self.active)
        merged["banned"] = sorted(self.banned)
        if evaluate:
            merged.update(self.evaluate())
        self._log(dict(merged), started)
        return merged

    def _stop_diverged(self, exc: Diverged, started: float) -> None:
        """End the run at the last completed step: its metrics, a final evaluation and a `diverged` event."""
        self._emit("diverged", peer=exc.peer, reason=str(exc))  # at the step it happened
        self.step = exc.step - 1
        self.diverged_at = exc.step
        self._log_window(started, evaluate=True)

    # ---- the honest-majority stop (runtime/majority.py) ------------------------------------------
    def _check_majority(self) -> dict | None:
        return majority.lost(self.config, self.byzantine, self.active, self.banned, self.silent_bans)

    def _lost_message(self, lost: dict) -> str:
        where = f" in {self.writer.dir}" if self.writer is not None else ""
        return (
            f"the run stopped at step {self.step}: {lost['reason']}. The defense's guarantees no longer hold, so "
            f"the run does not go on; its metrics and events so far are kept{where}"
        )

    def _stop_majority_lost(self, started: float) -> None:
        """Flush the logging window and, when checkpoints are on, keep a checkpoint of this step; then raise.
        Every process of the distributed runtime still in the run gets here at the same step (the check reads
        the common state; `_after_step` has already stopped a banned or cut-off one)."""
        self._sync()
        self._log_window(started)
        if self.final_checkpoint:
            self.save_checkpoint(time.perf_counter() - started)
        raise majority.HonestMajorityLost(self._lost_message(self.majority_lost))

    # ---- hooks the distributed runtime overrides -------------------------------------------------
    def _after_step(self) -> None:
        """Called after every step (distributed: stop a process whose peer is no longer active)."""

    def _sync(self) -> None:
        """Bring every peer's per-step telemetry to the writer (distributed: a gather to rank 0)."""

    def _checkpoint_due(self, step: int) -> bool:
        if step == self.config.train.steps:
            return self.final_checkpoint
        return self.checkpoint_every > 0 and step % self.checkpoint_every == 0

    # ---- logging window ------------------------------------------------------------------------
    def _merge_window(self) -> dict:
        """Average the window's records, with the per-step honest loss and byte counts (all peers)."""
        steps = list(range(self.step - len(self._window) + 1, self.step + 1))
        per_peer_sent: dict[int, list[int]] = {}
        per_peer_recv: dict[int, list[int]] = {}
        for step, record in zip(steps, self._window, strict=True):
            losses = self._losses.pop(step, None)
            if losses is not None:
                vals = [v for _, v in sorted(losses.items())]
                record["train_loss"] = sum(vals) / len(vals) if vals else float("nan")
            traffic = self._traffic.pop(step, None)
            if traffic is None:
                continue
            reported = [p for p in traffic["active"] if p in traffic["sent"]]  # a crashed peer reports nothing
            sent = [traffic["sent"][p] for p in reported]
            recv = [traffic["received"].get(p, 0) for p in reported]
            for p, v in zip(reported, sent, strict=True):
                per_peer_sent.setdefault(p, []).append(v)
            for p, v in zip(reported, recv, strict=True):
                per_peer_recv.setdefault(p, []).append(v)
            if sent:
                record["bytes_sent_mean"] = sum(sent) / len(sent)
                record["bytes_sent_max"] = max(sent)
                record["bytes_received_mean"] = sum(recv) / len(recv)
                record["bytes_received_max"] = max(recv)
        merged = _average(self._window)
        self._window = []
        if per_peer_sent:
            # bytes per step of each peer over the window (null: not active in the window)
            merged["bytes_sent_per_peer"] = [
                sum(per_peer_sent[p]) / len(per_peer_sent[p]) if p in per_peer_sent else None
                for p in range(self.config.peers)
            ]
            merged["bytes_received_per_peer"] = [
                sum(per_peer_recv[p]) / len(per_peer_recv[p]) if p in per_peer_recv else None
                for p in range(self.config.peers)
            ]
        return merged

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, elapsed: float) -> dict:
        """What every honest peer holds identically (see runtime/checkpoint.py)."""
        return {
            "version": 1,
            "config_hash": self.config.config_hash(),
            "step": self.step,
            "params": self.workload.flat_params.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "active": list(self.active),
            "banned": dict(self.banned),
            "silent_bans": sorted(self.silent_bans),
            "shared_random": self.shared_random,
            "previous": self.previous,
            "test_accuracy": self.test_accuracy,
            "best_accuracy": self.best_accuracy,
            "defense": ckpt.object_state(self.defense),
            "window": self._window,
            "losses": self._losses,
            "traffic": self._traffic,
            "elapsed": elapsed,
        }

    def peer_states(self) -> dict[int, bytes]:
        """Serialized own state of each peer hosted here that has one: its attack, its worker momentum."""
        buffers = self.worker_momentum.buffers if self.worker_momentum is not None else {}
        states = {}
        for p in self.comm.local_peers:
            own = {k: v for k, v in (("attack", self.attacks.get(p)), ("momentum", buffers.get(p))) if v is not None}
            if own:
                states[p] = ckpt.to_bytes(own)
        return states

    def load_state(self, state: dict, own: dict[int, bytes]) -> None:
        self.step = int(state["step"])
        self.workload.flat_params.copy_(state["params"].to(self.workload.flat_params.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.active = list(state["active"])
        self.banned = {int(k): int(v) for k, v in state["banned"].items()}
        self.silent_bans = {int(p) for p in state.get("silent_bans", ())}
        self.shared_random = state["shared_random"]
        prev = state["previous"]
        if prev is not None:
            prev.params = prev.params.to(self.device)
        self.previous = prev
        self.test_accuracy = state["test_accuracy"]
        self.best_accuracy = state["best_accuracy"]
        ckpt.restore_object_state(self.defense, state["defense"])
        self._window = list(state["window"])
        self._losses = dict(state["losses"])
        self._traffic = dict(state["traffic"])
        self.elapsed_before = float(state["elapsed"])
        for peer, blob in own.items():
            if peer not in self.comm.local_peers:
                continue
            saved = ckpt.from_bytes(blob)
            if not isinstance(saved, dict):  # an attack-<peer>.pt file: the attack alone
                saved = {"attack": saved}
            if peer in self.attacks and "attack" in saved:
                self.attacks[peer] = saved["attack"]
            if self.worker_momentum is not None and "momentum" in saved:
                self.worker_momentum.buffers[peer] = saved["momentum"].to(self.device)

    def save_checkpoint(self, elapsed: float) -> None:
        if self.writer is None:
            return
        ckpt.write(
            self.writer.dir, self.config, self.step, ckpt.to_bytes(self.state_dict(elapsed)), self.peer_states()
        )

    def _log(self, record: dict, started: float) -> None:
        record = {"step": record.pop("step"), **record, "time_s": round(time.perf_counter() - started, 3)}
        if self.writer is not None:
            self.writer.metrics(record)

    def summary(self, wall: float) -> dict:
        honest_banned = [p for p in self.banned if p not in self.byzantine]
        return {
            "name": self.config.name,
            "final_test_accuracy": self.test_accuracy,
            "best_test_accuracy": self.best_accuracy,
            "steps": self.step,
            "diverged_at": self.diverged_at,
            "wall_seconds": round(wall, 3),
            "byzantine_peers": self.byzantine,
            "banned": {str(p): s for p, s in sorted(self.banned.items())},
            "honest_banned": len(honest_banned),
            "byzantine_banned": len(self.banned) - len(honest_banned),
            "active_peers": len(self.active),
            "config_hash": self.config.config_hash(),
        }


def _average(records: list[dict]) -> dict:
    """Each numeric field over the logging window: the max for `*_max` fields (a mean of maxima would hide
    the worst step), the mean otherwise. NaNs (e.g. no honest loss) are skipped."""
    out: dict = {}
    keys = {k for r in records for k in r}
    for k in sorted(keys, key=lambda k: (k != "train_loss", k)):
        vals = [r[k] for r in records if k in r and isinstance(r[k], (int, float)) and not isinstance(r[k], bool)]
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            out[k] = max(finite) if k.endswith("_max") else sum(finite) / len(finite)
        elif vals:
            out[k] = float("nan")
    return out
