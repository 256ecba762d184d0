"""Time every aggregation rule on one (n, d) float32 CPU input, side by side in one run.

    .venv/bin/python benchmarks/bench_aggregators.py --n 16 --d 1000000 --repeats 3

Every rule and pre-aggregator in the registry is timed with its default parameters (a rule whose
preconditions this n and f break, e.g. bulyan's n >= 4f + 3, is skipped and says why), plus the median's
lower variant and BTARD's batched per-partition CenteredClip.

Input: n - f honest rows g + N(0, 1) sharing one random g, plus f Byzantine rows: sign flip, -10 g
(default), or ALIE (``--input alie``), the honest rows' coordinate mean minus z times their standard
deviation (``--z``), where the geometric median needs hundreds of Weiszfeld iterations. CenteredClip uses
tau = tau_scale * sqrt(d) on whole vectors (about the honest rows' distance to their mean) and the same
total radius split over n partitions, tau / sqrt(n), for the BTARD layout (n partitions of d / n). Each
time is the best of --repeats calls; the ratio is to the mean measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from byztrain import aggregators as A
from byztrain.errors import ConfigError
from byztrain.registry import AGGREGATORS, PRE_AGGREGATORS
from byztrain.rules import build_aggregator, build_pre_aggregator


def _bind(registry, name: str, n: int, f: int, tau: float, gen: torch.Generator):
    """The registry's rule with its default parameters, bound for n rows."""
    if registry is PRE_AGGREGATORS:
        return build_pre_aggregator(name, f=f, params=None, generator=gen, n=n)
    return build_aggregator(name, f=f, tau=tau, params=None, n=n, generator=gen)


def _call(bound, x: torch.Tensor, name: str, stats: dict[str, str]) -> None:
    bound(x)
    last = getattr(bound, "last_stats", None) or {}
    if "iterations" in last:
        stats[name] = f"{int(last['iterations'])} it" + (f", {int(last['clipped'])} clipped" if "clipped" in last else "")


def best_ms(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="rows (workers)")
    ap.add_argument("--d", type=int, default=1_000_000, help="dimension")
    ap.add_argument("--f", type=int, default=3, help="Byzantine rows, and the f given to the rules")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many calls")
    ap.add_argument("--tau-scale", type=float, default=1.0, help="CenteredClip tau = scale * sqrt(d)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input", choices=("sign_flip", "alie"), default="sign_flip", help="Byzantine rows")
    ap.add_argument("--z", type=float, default=1.0, help="ALIE's shift in honest standard deviations")
    ap.add_argument("--only", default=None, help="comma-separated rule names to time (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, d, f = args.n, args.d, args.f

    g = torch.Generator().manual_seed(args.seed)
    common = torch.randn(d, generator=g)
    honest = common + torch.randn(n - f, d, generator=g)
    bad = -10.0 * common if args.input == "sign_flip" else honest.mean(0) - args.z * honest.std(0)
    x = torch.cat([honest, bad.expand(f, d)])
    pad = -d % n  # BTARD layout: zero-pad to a multiple of n, n contiguous parts per row
    parts = torch.nn.functional.pad(x, (0, pad)).reshape(n, n, -1).transpose(0, 1).contiguous()
    tau = args.tau_scale * math.sqrt(d)
    tau_part = tau / math.sqrt(n)
    rule_gen = torch.Generator().manual_seed(args.seed + 1)  # dnc's and sign_guard's coordinate draws

    only = None if args.only is None else set(args.only.split(","))
    rules, stats = [], {}
    for registry, kind in ((AGGREGATORS, ""), (PRE_AGGREGATORS, " (pre)")):
        for name in registry:
            if only is not None and name not in only:
                continue
            try:
                bound = _bind(registry, name, n, f, tau, rule_gen)
            except ConfigError as err:  # a precondition this (n, f) breaks
                print(f"{name}: skipped, {err}")
                continue
            rules.append((f"{name}{kind}", lambda b=bound, nm=name: _call(b, x, nm, stats)))

    def cclip_parts():
        _, s = A.centered_clip_batched(parts, tau_part)
        it = s["iterations"]
        stats["cclip_batched"] = f"{int(it.min())}-{int(it.max())} it, {int(s['clipped'].sum())} clipped"

    if only is None or "median" in only:
        rules += [("median (lower)", lambda: A.coordinate_median(x, even="lower"))]
    if only is None or "cclip_batched" in only:
        rules += [(f"cclip_batched {n}x{n}x{parts.shape[2]}", cclip_parts)]
    if only is not None and "mean" not in only:  # the ratio column stays relative to the mean
        rules.insert(0, ("mean", lambda: A.mean(x)))
    print(
        f"n={n} d={d} f={f} {args.input} float32 CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"best of {args.repeats}; tau={tau:.4g} (partitions {tau_part:.4g})"
    )
    times = [(name, best_ms(fn, args.repeats)) for name, fn in rules]
    base = times[0][1]
    print(f"{'rule':<32} {'ms':>10} {'x mean':>8}  notes")
    for name, ms in times:
        key = name.split(" ")[0]
        print(f"{name:<32} {ms:>10.1f} {ms / base:>8.1f}  {stats.get(key, '')}")


if __name__ == "__main__":
    main()
