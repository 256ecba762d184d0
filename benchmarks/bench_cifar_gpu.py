"""The GPU check of issue 9: ResNet-18 / CIFAR-10 steps per second for 16 peers on one GPU, BTARD vs mean,
and whether a gradient recomputes bit for bit under the deterministic CUDA settings.

    .venv/bin/python benchmarks/bench_cifar_gpu.py                       # synthetic CIFAR-format data
    .venv/bin/python benchmarks/bench_cifar_gpu.py --data ~/.cache/byztrain/cifar10 --json

Without --data it writes a CIFAR-10-format folder of random pixels and labels (GPU machines are often
offline; the 163 MB archive does not travel with the tree): step time does not depend on pixel values, but
CenteredClip's iteration count does depend on the gradients, so BTARD's time on real data can differ.
Two trainers with the paper's settings (batch 8 per peer, SGD Nesterov, augmentation, tau 1, one
validator), identical except `defense.name`, advance in alternating blocks (as bench_btard.py); CUDA is
synchronised at every block end. Reported: median ms per step, steps/s, BTARD / mean, BTARD phase split,
CenteredClip iterations, one full evaluation (10,000 test images + BatchNorm recalibration), the
determinism check, and every distinct nondeterminism warning PyTorch raised (warn_only mode).
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from byztrain.config import Config
from byztrain.runtime.trainer import Trainer
from byztrain.tasks import cifar


def write_synthetic(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n_train // 5)
    for name, n in [(f, per) for f in cifar.TRAIN_FILES] + [(cifar.TEST_FILE, n_test)]:
        entry = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=4)
    return folder


def build(defense: str, args, data_dir: str) -> Trainer:
    data = {
        "seed": args.seed,
        "peers": args.peers,
        "task": {"dataset": "cifar10", "model": "resnet18", "data_dir": data_dir, "augment": True},
        "defense": {"name": defense, "validators": 1, "tau": args.tau},
        "train": {"batch_size": args.batch, "steps": 10**6, "lr": 0.01, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-4},
        "runtime": {"device": args.device},
        "log": {"tensorboard": False},
    }
    return Trainer(Config.from_dict(data), progress=False)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def determinism_check(tr: Trainer) -> dict:
    """One peer's gradient at the current parameters, recomputed from its public seed three times (the
    batch rebuilt each time, as a validator does): bitwise equal?"""
    w = tr.workload
    grads = []
    for _ in range(3):
        x, y = w.batch(1, 123456789)
        g, _ = w.gradient(x, y)
        grads.append(g.clone())
    return {"bitwise_equal": all(torch.equal(grads[0], g) for g in grads[1:]),
            "max_abs_diff": max(float((grads[0] - g).abs().max()) for g in grads[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="CIFAR-10 directory (default: write synthetic data to a temp dir)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=30, help="measured steps per defense")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=50_000, help="synthetic data only")
    ap.add_argument("--test-images", type=int, default=10_000, help="synthetic data only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data_dir = args.data or str(write_synthetic(Path(tmp) / cifar.FOLDER, args.train_images, args.test_images))
        trainers = {"mean": build("mean", args, data_dir), "btard": build("btard", args, data_dir)}
        for tr in trainers.values():
            for _ in range(args.warmup):
                tr.train_step()
        sync()
        btard = trainers["btard"].defense
        btard.timings.clear()
        blocks: dict[str, list[float]] = {name: [] for name in trainers}
        iters: list[float] = []
        done = 0
        while done < args.steps:
            k = min(args.block, args.steps - done)
            for name, tr in trainers.items():
                sync()
                start = time.perf_counter()
                for _ in range(k):
                    record = tr.train_step()
                    if name == "btard" and "cclip_iters_mean" in record:
                        iters.append(record["cclip_iters_mean"])
                sync()
                blocks[name].append((time.perf_counter() - start) / k)
            done += k
        sync()
        start = time.perf_counter()
        loss, acc = trainers["mean"].workload.evaluate()
        sync()
        eval_s = time.perf_counter() - start
        det = determinism_check(trainers["btard"])
    mean_s, btard_s = statistics.median(blocks["mean"]), statistics.median(blocks["btard"])
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "data": "real" if args.data else "synthetic",
        "peers": args.peers,
        "batch": args.batch,
        "tau": args.tau,
        "steps": args.steps,
        "mean_step_ms": round(mean_s * 1e3, 2),
        "btard_step_ms": round(btard_s * 1e3, 2),
        "mean_steps_per_s": round(1 / mean_s, 2),
        "btard_steps_per_s": round(1 / btard_s, 2),
        "btard_over_mean": round(btard_s / mean_s, 3),
        "btard_phase_ms": {k: round(v / args.steps * 1e3, 2)
                           for k, v in sorted(btard.timings.items(), key=lambda kv: -kv[1])},
        "cclip_iters_mean": round(statistics.mean(iters), 1) if iters else None,
        "eval_s": round(eval_s, 3),
        "determinism": det,
        "btard_banned": sorted(trainers["btard"].banned),
        "nondeterminism_warnings": sorted({str(w.message)[:200] for w in caught
                                           if "deterministic" in str(w.message)}),
        "gpu_max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
        else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
