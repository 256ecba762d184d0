"""Lower bounds on P1 and P2 (issue 8) from the parts no implementation of the step can skip.

    .venv/bin/python benchmarks/bench_floor.py                  # 16 peers x batch 32, default CNN, 1 thread
    .venv/bin/python benchmarks/bench_floor.py --json

Every quantity is timed side by side in alternating blocks (`byztrain.bench.interleaved`), on real
Fashion-MNIST gradients at the initial parameters, at one torch thread (how sweep workers run):

- `fused`: one forward+backward over all n * batch samples (P2's denominator);
- `per_peer`: n forward+backward passes of `batch` samples, the work of any per-peer scheme whose gradients
  a validator can recompute bit for bit (docs/performance.md: batched or grouped kernels do not give the
  single-peer bits); `one_peer`: one such pass (the validator's recomputation);
- `mean_step`: a whole mean-aggregation step (P1's denominator, P2's numerator);
- the BTARD protocol work on the (P, n, k) stack of the n - m senders' padded gradients, m = 1:
  `sha256` (every sender commits to every part), `median` (CenteredClip's start), `cclip_iteration`
  (one more iteration; at least two run: the second confirms convergence), `check` (the q = 3 directions and
  the float64 scalars (s_ij, d_ij) of every row, computed once per partition as the simulator does),
  `copy` (one pass over the stack, what building it costs at least).

From these: P2 >= per_peer / fused, and the protocol floor W = sha256 + median + 2 * cclip_iteration +
check + copy gives P1 >= 1 + (W + one_peer - per_peer / n) / mean_step. With a hypothetical per-peer
scheme as cheap as the fused pass, P1 * P2 = btard_step / fused >= ((n - m) / n * fused + one_peer + W) /
fused, to compare with the targets' product 1.15 * 1.10 = 1.265.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from byztrain.aggregators import centered_clip_batched
from byztrain.bench import _config, _trainer, fused_step, interleaved
from byztrain.order_stats import lower_median
from byztrain.protocol.commitments import digest_many
from byztrain.protocol.partition import layout_for
from byztrain.protocol.verification import draw_projections, partition_scalars


def measure(peers: int, batch: int, rounds: int, per_round: int, clock) -> dict:
    mean = _trainer(_config(peers, "mean", batch=batch))
    w = mean.workload
    batches = [w.batch(p, 1000 + p) for p in range(peers)]
    out = torch.empty(w.dim)

    def per_peer():
        for x, y in batches:
            w.gradient(x, y, out)

    senders = peers - 1  # m = 1 validator computes no gradient of its own
    grads = torch.stack([w.gradient(x, y)[0].clone() for x, y in batches[:senders]])
    layout = layout_for(w.dim, tuple(range(senders)))  # as many parts as senders, as BTARD cuts them
    parts_n, k = layout.parts, layout.part_size
    padded = torch.stack([layout.pad(g) for g in grads])  # (n, P, k)
    stack = padded.transpose(0, 1).contiguous()  # (P, n, k): partition j holds every sender's part j
    flat_parts = list(padded.view(senders * parts_n, k).unbind(0))  # what the senders commit to
    ghat = stack.mean(dim=1)
    tau = 1.0

    def check():
        z = draw_projections(7, 3, parts_n, k)
        z64 = z.to(torch.float64)
        for j in range(parts_n):  # each partition's scalars, as the simulator derives them once
            partition_scalars(stack[j], ghat[j], z64[:, j])

    fns = {
        "fused": fused_step(mean),
        "per_peer": per_peer,
        "one_peer": lambda: w.gradient(*batches[0], out),
        "mean_step": mean.train_step,
        "sha256": lambda: digest_many(flat_parts, threads=1),
        "median": lambda: lower_median(stack, 1),
        "cclip_1": lambda: centered_clip_batched(stack, tau, max_iters=1),
        "cclip_2": lambda: centered_clip_batched(stack, tau, max_iters=2),
        "check": check,
        "copy": lambda: stack.clone(),
    }
    t = interleaved(fns, rounds=rounds, per_round=per_round, clock=clock)
    t["cclip_iteration"] = max(0.0, t["cclip_2"] - t["cclip_1"])
    work = t["sha256"] + t["median"] + 2 * t["cclip_iteration"] + t["check"] + t["copy"]
    p1_floor = 1 + (work + t["one_peer"] - t["per_peer"] / peers) / t["mean_step"]
    p2_floor = t["per_peer"] / t["fused"]
    product_floor = ((peers - 1) / peers * t["fused"] + t["one_peer"] + work) / t["fused"]
    return {
        "seconds": t,
        "protocol_floor_seconds": work,
        "p1_floor": p1_floor,
        "p2_floor": p2_floor,
        "p1_times_p2_floor_if_batched": product_floor,
        "targets": {"p1": 1.15, "p2": 1.10, "p1_times_p2": 1.15 * 1.10},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    r = measure(args.peers, args.batch, args.rounds, args.per_round, clock)
    if args.json:
        print(json.dumps(r))
        return
    for name, sec in r["seconds"].items():
        print(f"{name:16s} {sec * 1e3:8.2f} ms")
    print(f"protocol floor W {r['protocol_floor_seconds'] * 1e3:8.2f} ms")
    print(f"P1 >= {r['p1_floor']:.3f} (target 1.15)   P2 >= {r['p2_floor']:.3f} (target 1.10)")
    print(f"P1 * P2 >= {r['p1_times_p2_floor_if_batched']:.3f} even with per-peer gradients at the fused cost "
          f"(targets' product {1.15 * 1.10:.3f})")


if __name__ == "__main__":
    main()
