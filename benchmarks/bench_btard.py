"""BTARD step time against the mean-aggregation step time, measured side by side in one run.

    .venv/bin/python benchmarks/bench_btard.py                 # 16 peers, default CNN, batch 32, m = 1
    .venv/bin/python benchmarks/bench_btard.py --steps 30 --attack sign_flip --byzantine 7

Two trainers with the same config except `defense.name` (mean vs btard) advance in alternating blocks of
--block steps, so machine load hits both alike; each reported time is the median over blocks of the mean
step time in a block. Both include the peers' gradients (the dominant cost); the difference is the protocol:
hashing, scatter checks, CenteredClip, MPRNG, the projection check and the validator's recomputation.
The per-phase split of the BTARD time comes from `BtardDefense.timings`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from byztrain.config import Config
from byztrain.runtime.trainer import Trainer


def build(defense: str, args) -> Trainer:
    data = {
        "seed": args.seed,
        "peers": args.peers,
        "byzantine": args.byzantine,
        "attack": {"name": args.attack, "start": 1},
        "defense": {"name": defense, "validators": args.validators, "tau": args.tau},
        "train": {"batch_size": args.batch, "steps": 10**6},
        "log": {"tensorboard": False},
    }
    if args.attack == "none":
        data["byzantine"] = 0
        data.pop("attack")
    return Trainer(Config.from_dict(data), progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--validators", type=int, default=1)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=40, help="measured steps per defense")
    ap.add_argument("--block", type=int, default=5, help="steps per alternating block")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attack", default="none")
    ap.add_argument("--byzantine", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as sweeps run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    trainers = {"mean": build("mean", args), "btard": build("btard", args)}
    for tr in trainers.values():
        for _ in range(args.warmup):
            tr.train_step()
    btard = trainers["btard"].defense
    btard.timings.clear()
    blocks: dict[str, list[float]] = {name: [] for name in trainers}
    done = 0
    while done < args.steps:
        k = min(args.block, args.steps - done)
        for name, tr in trainers.items():
            start = time.perf_counter()
            for _ in range(k):
                tr.train_step()
            blocks[name].append((time.perf_counter() - start) / k)
        done += k
    mean_s = statistics.median(blocks["mean"])
    btard_s = statistics.median(blocks["btard"])
    phases = {k: v / args.steps for k, v in sorted(btard.timings.items(), key=lambda kv: -kv[1])}
    result = {
        "peers": args.peers,
        "batch": args.batch,
        "validators": args.validators,
        "dim": trainers["btard"].workload.dim,
        "threads": args.threads,
        "steps": args.steps,
        "mean_step_s": round(mean_s, 5),
        "btard_step_s": round(btard_s, 5),
        "btard_over_mean": round(btard_s / mean_s, 3),
        "btard_phase_s": {k: round(v, 5) for k, v in phases.items()},
        "btard_banned": sorted(trainers["btard"].banned),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.peers} peers, d = {result['dim']}, batch {args.batch}, m = {args.validators}, "
          f"{args.threads} thread(s), {args.steps} steps each, alternating blocks of {args.block}")
    print(f"mean  step: {mean_s * 1e3:8.1f} ms")
    print(f"btard step: {btard_s * 1e3:8.1f} ms")
    print(f"BTARD / mean step time: {btard_s / mean_s:.2f}")
    print("btard phases (ms/step): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
