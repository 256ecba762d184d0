"""Distributed vs simulated step time, and bytes per peer per step against the bandwidth optimum.

    .venv/bin/python benchmarks/bench_distributed.py                       # 8 peers, btard and mean, 30 steps
    .venv/bin/python benchmarks/bench_distributed.py --peers 8 --defense btard --steps 60 --json

For each defense, the same config (Fashion-MNIST, the default CNN, batch 32 per peer, one thread per peer)
runs simulated, distributed (one process per peer, gloo over 127.0.0.1), then simulated again; machine load
drifts, so the simulated time is the mean of the two runs around the distributed one. A step time is the
mean of the time between consecutive logged steps, skipping the first --warmup steps and the final
evaluation step; process start-up (importing torch, loading the data, connecting) is reported apart.

Bytes are what the distributed runtime wrote to its sockets per peer and step (payloads, the pickled
skeleton of each message, 8-byte headers, the all-gather agreement masks), from metrics.jsonl
(`bytes_sent_mean` / `bytes_sent_max`, `bytes_received_*`), against 2 x d x 4 bytes: what a
bandwidth-optimal all-reduce of d float32 sends per peer (reduce-scatter + all-gather, (n-1)/n x d each).
BTARD's butterfly is that shape plus its small messages (hashes, check scalars, MPRNG); the `mean`
baseline all-gathers full gradients, (n-1) x d x 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import byztrain
from byztrain.config import Config
from byztrain.runtime import checkpoint as ckpt


def config(args, defense: str, kind: str, out: Path) -> Config:
    data = {
        "name": f"bench-{defense}-{kind}",
        "seed": args.seed,
        "peers": args.peers,
        "byzantine": args.byzantine,
        "attack": {"name": args.attack if args.byzantine else "none", "start": 1},
        "defense": {"name": defense},
        "task": {"data_dir": args.data_dir},
        "train": {"steps": args.steps, "eval_every": args.steps, "batch_size": args.batch},
        "runtime": {"kind": kind, "threads": 1, "timeout_s": 300, "checkpoint_every": 0},
        "log": {"out": str(out), "every": 1, "tensorboard": False},
    }
    return Config.from_dict(data)


def measure(cfg: Config, warmup: int) -> dict:
    t0 = time.perf_counter()
    summary = byztrain.run(cfg, quiet=True)
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(cfg.log.out) / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    last = cfg.train.steps - 1  # the final step also evaluates: left out
    times = [by_step[s]["time_s"] - by_step[s - 1]["time_s"] for s in range(warmup + 1, last + 1)]
    out = {
        "step_s": statistics.mean(times),
        "step_s_median": statistics.median(times),
        "startup_s": total - summary["wall_seconds"],
        "wall_s": total,
        "banned": summary["banned"],
    }
    train = [by_step[s] for s in range(warmup + 1, last + 1)]
    for key in ("bytes_sent_mean", "bytes_sent_max", "bytes_received_mean", "bytes_received_max"):
        vals = [r[key] for r in train if r.get(key) is not None]
        if vals:
            out[key] = statistics.mean(vals)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--defense", action="append", help="btard and/or mean (default: both)")
    ap.add_argument("--byzantine", type=int, default=0)
    ap.add_argument("--attack", default="sign_flip")
    ap.add_argument("--data-dir", default=None, help="task.data_dir (default: the usual search)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    defenses = args.defense or ["btard", "mean"]
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-distributed-"))

    result: dict = {"peers": args.peers, "steps": args.steps, "batch": args.batch, "defenses": {}}
    for defense in defenses:
        sim1 = measure(config(args, defense, "simulated", base / f"{defense}-sim1"), args.warmup)
        dis = measure(config(args, defense, "distributed", base / f"{defense}-dist"), args.warmup)
        sim2 = measure(config(args, defense, "simulated", base / f"{defense}-sim2"), args.warmup)
        d = None
        info = ckpt.latest(base / f"{defense}-dist")
        if info is not None:
            d = ckpt.from_bytes(ckpt.read(info)[0])["params"].numel()
        sim_step = (sim1["step_s"] + sim2["step_s"]) / 2
        entry = {
            "simulated_step_s": sim_step,
            "distributed_step_s": dis["step_s"],
            "distributed_over_simulated": dis["step_s"] / sim_step,
            "distributed_startup_s": dis["startup_s"],
            "same_bans": sim1["banned"] == dis["banned"] == sim2["banned"],
            "d": d,
        }
        if d:
            optimal = 2 * d * 4
            entry["optimal_bytes_per_peer_step"] = optimal
            for key in ("bytes_sent_mean", "bytes_sent_max", "bytes_received_mean", "bytes_received_max"):
                if key in dis:
                    entry[key] = dis[key]
                    entry[key + "_over_optimal"] = dis[key] / optimal
        result["defenses"][defense] = entry
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.peers} peers, {args.steps} steps, batch {args.batch}, runs in {base}")
    for defense, e in result["defenses"].items():
        print(f"\n[{defense}]")
        print(f"  step time: simulated {e['simulated_step_s'] * 1e3:.1f} ms, distributed "
              f"{e['distributed_step_s'] * 1e3:.1f} ms  (x{e['distributed_over_simulated']:.2f}); "
              f"distributed start-up {e['distributed_startup_s']:.1f} s")
        if e.get("d"):
            print(f"  d = {e['d']}, 2 x d x 4 = {e['optimal_bytes_per_peer_step'] / 1e6:.3f} MB per peer per step")
            print(f"  sent/peer/step: mean {e['bytes_sent_mean'] / 1e6:.3f} MB "
                  f"(x{e['bytes_sent_mean_over_optimal']:.3f} of optimal), max {e['bytes_sent_max'] / 1e6:.3f} MB "
                  f"(x{e['bytes_sent_max_over_optimal']:.3f})")
            print(f"  received/peer/step: mean {e['bytes_received_mean'] / 1e6:.3f} MB "
                  f"(x{e['bytes_received_mean_over_optimal']:.3f}), max {e['bytes_received_max'] / 1e6:.3f} MB")
        print(f"  same bans in both runtimes: {e['same_bans']}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
