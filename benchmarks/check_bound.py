"""What BTARD's aggregation check lets through: measured escape rates on real gradients.

    .venv/bin/python benchmarks/check_bound.py                 # Fashion-MNIST, 16 peers, tau 1, q 3
    .venv/bin/python benchmarks/check_bound.py --tau 0.1 --draws 2000 --colluders 0 1 3

Takes the peers' gradients at a few steps of an honest run, builds every partition as the protocol does,
and for a cheating aggregator that publishes ĝ[j] + delta (delta random, of a given norm) computes the
check's residual R^l = sum_i w_ij s_ij over fresh Gaussian directions z. The cheat escapes a direction when
|R^l| <= check_rtol * sum_i min(d_ij, tau) and no scalar is implausible; it escapes the check when it
escapes all q directions, no scalar is implausible and (from 8 workers) the scalars' median is not off
centre. With `--colluders c`, c of the partition's senders also lie in their scalars for that partition,
as far as plausibility allows, to cancel the residual (docs/protocol.md, collusion). Prints one row per
(norm, colluders).
"""

from __future__ import annotations

import argparse

import torch

from byztrain.aggregators import centered_clip_irls_batched
from byztrain.config import Config
from byztrain.protocol.btard import MEDIAN_RULE_MIN_ROWS
from byztrain.protocol.partition import layout_for
from byztrain.protocol.verification import clip_mass, default_check_rtol, implausible, off_centre
from byztrain.runtime.trainer import Trainer


def partitions(args) -> list[torch.Tensor]:
    """(n, k) blocks of honest gradient parts at steps spread over a short honest run."""
    cfg = Config.from_dict({
        "seed": 0, "peers": args.peers, "defense": {"name": "btard", "tau": args.tau, "validators": 0},
        "train": {"steps": 10**6, "batch_size": 32}, "log": {"tensorboard": False},
    })
    tr = Trainer(cfg, progress=False)
    out = []
    for step in range(1, args.steps + 1):
        if step % max(1, args.steps // 4) == 0:
            rnd = tr.make_round(step)
            grads = torch.stack([rnd.honest_gradient(p) for p in range(args.peers)])
            layout = layout_for(tr.workload.dim, tuple(range(args.peers)))
            X = torch.stack([layout.pad(g) for g in grads]).transpose(0, 1).contiguous()
            out += [X[j] for j in range(0, layout.parts, max(1, layout.parts // 4))]
        tr.train_step()
    return out


def escape_rate(x, tau, size_in_tau, colluders, args, gen) -> float:
    """Share of (delta, z) draws in which an aggregate moved by `size_in_tau` x tau passes every test.
    The first `colluders` rows lie for the aggregator: the largest plausible scalars (d_ij claimed huge, so
    |s_ij| <= scalar_bound * d_ij leaves each of them up to scalar_bound * tau of the weighted sum) that
    cancel the honest rows' sum; the other rows report the truth."""
    n, k = x.shape
    v, _ = centered_clip_irls_batched(x[None], tau)
    rtol = default_check_rtol(1e-6, n)
    escaped = 0
    for _ in range(args.draws):
        u = torch.randn(k, generator=gen, dtype=torch.float64)
        bad = v[0].double() + u / u.norm() * size_in_tau * tau
        diff = x.double() - bad
        z = torch.randn(args.q, k, generator=gen, dtype=torch.float64)
        S, D = diff @ z.T, diff.norm(dim=1)
        if colluders:
            honest = (torch.clamp(tau / D[colluders:], max=1.0)[:, None] * S[colluders:]).sum(dim=0)
            D[:colluders] = 1e12
            S[:colluders] = -honest / colluders * (1e12 / tau)
        W = torch.clamp(tau / D, max=1.0)
        R = (W[:, None] * S).sum(dim=0)
        ok = bool((R.abs() <= rtol * clip_mass(D[:, None], tau)[0]).all())
        ok = ok and not bool(implausible(S[:, None], D[:, None], args.scalar_bound)[0])
        if args.median_rule and n >= MEDIAN_RULE_MIN_ROWS:
            ok = ok and not bool(off_centre(S[:, None], args.median_bound, tau)[0])
        escaped += ok
    return escaped / args.draws


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--q", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="honest steps to sample gradients from")
    ap.add_argument("--draws", type=int, default=500, help="(delta, z) draws per partition and norm")
    ap.add_argument("--scalar-bound", type=float, default=7.0)
    ap.add_argument("--median-bound", type=float, default=8.0)
    ap.add_argument("--no-median-rule", dest="median_rule", action="store_false",
                    help="leave out the median rule (what colluders get past without it)")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e3])
    ap.add_argument("--colluders", type=int, nargs="+", default=[0, 3, 6])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    blocks = partitions(args)
    gen = torch.Generator().manual_seed(0)
    print(f"{len(blocks)} partitions of {blocks[0].shape[1]} coordinates, n = {args.peers}, tau = {args.tau}, "
          f"q = {args.q}, {args.draws} draws each")
    print("||delta|| / tau | colluders | escape rate (mean over partitions)")
    for c in args.colluders:
        for size in args.sizes:
            rate = sum(escape_rate(x, args.tau, size, c, args, gen) for x in blocks) / len(blocks)
            print(f"{size:15.0e} | {c:9d} | {rate:.4f}")


if __name__ == "__main__":
    main()
