"""The training loop shared by both runtimes: rounds, defense, optimizer, evaluation, logging.

A runtime differs only in its Collective and in which peers it hosts; the step logic is here once.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import torch

from byztrain.attacks import Attack, attack_active, build_attack
from byztrain.comm import Collective, LocalCollective
from byztrain.config import Config
from byztrain.defenses import Defense, build_defense
from byztrain.runtime.outputs import RunWriter
from byztrain.runtime.round import History, Round
from byztrain.runtime.workload import Workload, public_seed


def choose_byzantine(config: Config) -> list[int]:
    """Byzantine peers drawn from the run seed; peer 0 (which evaluates and logs) always stays honest."""
    rng = random.Random(config.seed)
    return sorted(rng.sample(range(1, config.peers), config.byzantine))


def lr_at(config: Config, step: int) -> float:
    """Learning rate for step `step` (1-based)."""
    t = config.train
    if t.schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / t.steps))
    return t.lr


class Trainer:
    def __init__(
        self,
        config: Config,
        *,
        comm: Collective | None = None,
        writer: RunWriter | None = None,
        progress: bool = True,
    ):
        self.config = config
        self.device = torch.device(config.runtime.device)
        self.workload = Workload(config, self.device)
        self.comm = comm or LocalCollective(list(range(config.peers)))
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
        self.step = 0
        self.test_accuracy: float | None = None
        self.best_accuracy: float | None = None

    # ---- events --------------------------------------------------------------------------------
    def _emit(self, type: str, peer: int | None = None, by: int | None = None, reason: str = "", **extra) -> None:
        if self.writer is not None:
            self.writer.event({"step": self.step, "type": type, "peer": peer, "by": by, "reason": reason, **extra})

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        self.step += 1
        step = self.step
        rnd = Round(
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
        )
        params_before = self.workload.flat_params.clone() if self.keep_history else None
        result = self.defense.step(rnd)
        update = result.update
        if not torch.isfinite(update).all():
            # Cannot happen with a sound defense; with `mean` an attacker can send Inf. Skip rather than
            # poison the parameters, and say so.
            self._emit("update_skipped", reason="non-finite aggregate")
            update = torch.zeros_like(update)
        self.flat_grad.copy_(update)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.config, step)
        self.optimizer.step()

        if self.keep_history:
            self.previous = History(step, params_before, self.shared_random, tuple(rnd.active))
        if result.shared_random is not None:
            self.shared_random = result.shared_random
        else:
            self.shared_random = public_seed(self.config.seed, step, -1, 0)
        for peer in rnd.banned_now:
            if peer in self.active:
                self.active.remove(peer)
                self.banned[peer] = step

        losses = list(rnd.losses.values())
        record = {
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": lr_at(self.config, step),
            "update_norm": update.norm().item(),
        }
        record.update(result.stats)
        return record

    def evaluate(self) -> dict:
        loss, acc = self.workload.evaluate()
        self.test_accuracy = acc
        self.best_accuracy = acc if self.best_accuracy is None else max(self.best_accuracy, acc)
        return {"test_loss": loss, "test_accuracy": acc}

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        cfg = self.config
        started = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.steps, desc=cfg.name, unit="step", dynamic_ncols=True, leave=True)
        self._log({"step": 0, **self.evaluate(), "active_peers": len(self.active), "banned": []}, started)
        window: list[dict] = []
        while self.step < cfg.train.steps:
            record = self.train_step()
            window.append(record)
            step = self.step
            is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
            if step % cfg.log.every == 0 or is_eval:
                merged = _average(window)
                window = []
                merged["step"] = step
                merged["active_peers"] = len(self.active)
                merged["banned"] = sorted(self.banned)
                if is_eval:
                    merged.update(self.evaluate())
                self._log(merged, started)
                if bar is not None:
                    post = {"loss": f"{merged['train_loss']:.3f}"}
                    if self.test_accuracy is not None:
                        post["acc"] = f"{self.test_accuracy:.3f}"
                    if self.banned:
                        post["banned"] = len(self.banned)
                    bar.set_postfix(post, refresh=False)
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step)
        if bar is not None:
            bar.close()
        return self.summary(time.perf_counter() - started)

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
            "wall_seconds": round(wall, 3),
            "byzantine_peers": self.byzantine,
            "banned": {str(p): s for p, s in sorted(self.banned.items())},
            "honest_banned": len(honest_banned),
            "byzantine_banned": len(self.banned) - len(honest_banned),
            "active_peers": len(self.active),
            "config_hash": self.config.config_hash(),
        }


def _average(records: list[dict]) -> dict:
    """Mean of each numeric field over the logging window (NaNs, e.g. no honest loss, are skipped)."""
    out: dict = {}
    keys = {k for r in records for k in r}
    for k in sorted(keys, key=lambda k: (k != "train_loss", k)):
        vals = [r[k] for r in records if k in r and isinstance(r[k], (int, float)) and not isinstance(r[k], bool)]
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            out[k] = sum(finite) / len(finite)
        elif vals:
            out[k] = float("nan")
    return out
