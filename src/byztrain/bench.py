"""`byztrain bench`: performance ratios measured side by side in one process.

Ratios, not absolute times, are the targets (docs/performance.md): the machines are shared and noisy, and
a ratio of two timings taken in interleaved blocks cancels most of that noise.

- P1 = BTARD step / mean-aggregation step (16 peers x batch 32, m = 1 validator);
- P2 = mean-aggregation step / one fused forward+backward over all peers' samples (the compute floor);
- P4 = seconds per sample of a mean-aggregation step for n in {8, 16, 32, 64} peers at fixed batch per peer;
- the projected time of the seed grid (27 BTARD runs of 1000 steps) with `--jobs` parallel runs.

`--clock cpu` times with the process CPU clock instead of the wall clock: at `--threads 1` on a shared,
loaded machine it measures the work done rather than the time spent waiting for a core (at more threads
it also counts OpenMP spin-waits, so use the wall clock there). docs/performance.md has the measurements.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from byztrain.config import Config
from byztrain.runtime.trainer import Trainer


def _config(peers: int, defense: str, *, byzantine: int = 0, attack: str = "none", batch: int = 32,
            steps: int = 1000) -> Config:
    return Config.from_dict({
        "name": f"bench-{defense}-{peers}",
        "peers": peers,
        "byzantine": byzantine,
        "attack": {"name": attack, "start": 0},
        "defense": {"name": defense, "validators": 1},
        "train": {"steps": steps, "batch_size": batch, "eval_every": steps},
        "log": {"tensorboard": False},
    })


def _trainer(config: Config):
    return Trainer(config, writer=None, progress=False)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _median_time(fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, per_round: int, warmup: int = 2,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median seconds per call of each function, measured in alternating blocks (noise hits all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_median_time(fn, per_round, clock))
    return {k: statistics.median(v) for k, v in samples.items()}


def fused_step(trainer) -> Callable[[], object]:
    """One forward+backward over all peers' samples at once: what any per-peer scheme must approach."""
    w = trainer.workload
    peers = trainer.config.peers
    batches = [w.batch(p, 1000 + p) for p in range(peers)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    out = torch.empty(w.dim)
    return lambda: w.gradient(x, y, out)


def _per_step(trainer, steps: int, clock: Callable[[], float]) -> float:
    t0 = clock()
    for _ in range(steps):
        trainer.train_step()
    return (clock() - t0) / steps


def measure(*, rounds: int = 5, per_round: int = 5, peers_list=(8, 16, 32, 64), grid_steps: int = 60,
            jobs: int = 2, clock: str = "wall", log: Callable[[str], None] = lambda s: None) -> dict:
    tick = CLOCKS[clock]
    mean16 = _trainer(_config(16, "mean"))
    btard16 = _trainer(_config(16, "btard"))
    log("P1/P2: 16 peers x batch 32 (interleaved)")
    t = interleaved(
        {"mean": mean16.train_step, "btard": btard16.train_step, "fused": fused_step(mean16)},
        rounds=rounds, per_round=per_round, clock=tick,
    )
    steps = btard16.step
    result = {
        "threads": torch.get_num_threads(),
        "clock": clock,
        "step_seconds": {"mean_16": t["mean"], "btard_16": t["btard"], "fused_16": t["fused"]},
        "p1_btard_over_mean": t["btard"] / t["mean"],
        "p2_mean_over_fused": t["mean"] / t["fused"],
        # where a BTARD step goes (wall seconds per step, averaged over every step the trainer ran)
        "btard_phase_seconds": {k: v / steps for k, v in btard16.defense.timings.items()},
    }
    log(f"  mean {t['mean'] * 1e3:.1f} ms, btard {t['btard'] * 1e3:.1f} ms, fused {t['fused'] * 1e3:.1f} ms")
    log("  btard phases: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in result["btard_phase_seconds"].items()))

    log("P4: seconds per sample vs peers (mean aggregation, batch 32 per peer)")
    trainers = {n: _trainer(_config(n, "mean")) for n in peers_list}
    t4 = interleaved({str(n): trainers[n].train_step for n in peers_list}, rounds=rounds,
                     per_round=max(2, per_round // 2), clock=tick)
    per_sample = {str(n): t4[str(n)] / (n * 32) for n in peers_list}
    result["p4_per_sample"] = per_sample
    base = per_sample[str(16)] if "16" in per_sample else next(iter(per_sample.values()))
    result["p4_spread"] = max(per_sample.values()) / min(per_sample.values()) - 1
    log("  " + ", ".join(f"n={n}: {v * 1e6:.1f} us ({v / base:.2f}x)" for n, v in per_sample.items()))

    # One seed-grid run (experiments/seed-grid.yaml): BTARD, 16 peers of which 7 Byzantine, attack from step
    # 200, evaluations every 50 steps, one thread as in a sweep worker. Steps 1-200 are honest steps; steps
    # 201-1000 are modelled by the first `grid_steps` steps of a sign-flip attack (the attackers' bans
    # included; later steps run with fewer peers and are cheaper, so this errs on the slow side).
    log(f"grid: one seed-grid run at 1 thread ({grid_steps} honest + {grid_steps} attacked steps timed)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        honest = _trainer(_config(16, "btard", byzantine=7, steps=1000))
        per_honest = _per_step(honest, grid_steps, tick)
        attacked = _trainer(_config(16, "btard", byzantine=7, attack="sign_flip", steps=1000))
        per_attacked = _per_step(attacked, grid_steps, tick)
        t0 = tick()
        attacked.evaluate()
        per_eval = tick() - t0
    finally:
        torch.set_num_threads(threads)
    run_seconds = 200 * per_honest + 800 * per_attacked + (1000 // 50 + 1) * per_eval
    result["grid_step_seconds"] = {"honest": per_honest, "attacked": per_attacked, "eval": per_eval}
    result["grid_run_seconds"] = run_seconds
    result["grid_projected_minutes"] = 27 * run_seconds / jobs / 60
    result["grid_jobs"] = jobs
    log(f"  {per_honest * 1e3:.1f} ms/honest step, {per_attacked * 1e3:.1f} ms/attacked step, eval "
        f"{per_eval:.2f} s -> run {run_seconds:.0f} s, 27 runs / {jobs} jobs = "
        f"{result['grid_projected_minutes']:.1f} min")
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    result = measure(rounds=args.rounds, per_round=args.per_round, grid_steps=args.grid_steps, jobs=args.jobs,
                     clock=args.clock, log=log)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"P1 btard/mean        {result['p1_btard_over_mean']:.3f}  (target <= 1.15)")
        print(f"P2 mean/fused        {result['p2_mean_over_fused']:.3f}  (target <= 1.10)")
        print(f"P4 per-sample spread {result['p4_spread'] * 100:.1f}%  (target within +-15%)")
        print(f"seed grid projected  {result['grid_projected_minutes']:.1f} min with --jobs {args.jobs}"
              f"  (target <= 20)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure performance ratios (P1, P2, P4, grid projection)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    p.add_argument("--per-round", type=int, default=5, help="steps timed per function per round")
    p.add_argument("--grid-steps", type=int, default=60, help="steps timed for the grid projection")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs assumed for the grid projection")
    p.add_argument("--threads", type=int, default=None, help="torch threads for P1/P2/P4")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: process CPU time, robust on a loaded machine at --threads 1")
    p.set_defaults(func=cmd_bench)
