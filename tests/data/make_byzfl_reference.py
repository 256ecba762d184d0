"""Generate tests/data/byzfl_reference.json: ByzFL 0.0.11's outputs on fixed random inputs.

Run once, OUTSIDE the project's environment (byzfl is never a dependency of byztrain):

    python -m venv /tmp/byzfl-venv
    /tmp/byzfl-venv/bin/pip install torch numpy scipy
    /tmp/byzfl-venv/bin/pip install --no-deps byzfl==0.0.11
    /tmp/byzfl-venv/bin/python tests/data/make_byzfl_reference.py

byzfl 0.0.11 declares torch==2.14.1 and torchvision; its aggregators, pre-aggregators and attacks are
plain torch / numpy code, so it is installed without dependencies over the torch at hand, and its
training package (the only user of torchvision) is replaced by an empty module before import.

Inputs are float32-representable (so the float32 torch path and the float64 numpy path see the same
numbers): n - f honest rows around a common vector, then f outliers (a scaled flip of the common
vector, a far random row, or duplicates). Deterministic rules are called on float64 numpy arrays;
The optimal attacks are called on the n - f honest rows, with Meamed over ARC (defaults) and with
trimmed mean over static clipping (non-default search parameters). CAF and SMEA draw their power-iteration start from the global torch RNG, so they are called on float32
torch tensors right after ``torch.manual_seed(seed)``, and the seed is stored with the case.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.modules["byzfl.benchmark"] = types.ModuleType("byzfl.benchmark")  # needs torchvision; unused here
import byzfl  # noqa: E402

CASES = [  # (n, f, d, outlier kind)
    (5, 1, 3, "flip"),
    (7, 2, 10, "far"),
    (7, 3, 6, "duplicate"),
    (10, 3, 20, "flip"),
    (11, 4, 16, "far"),
    (12, 5, 8, "duplicate"),
]


def make_input(n: int, f: int, d: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    common = rng.normal(size=d)
    x = common + rng.normal(size=(n, d)) * rng.uniform(0.2, 2.0, size=(n, 1))
    if kind == "flip":
        x[n - f :] = -10.0 * common + 0.1 * rng.normal(size=(f, d))
    elif kind == "far":
        x[n - f :] = 50.0 * rng.normal(size=(f, d))
    else:
        x[n - f :] = common + 5.0 * rng.normal(size=d)
    return x.astype(np.float32).astype(np.float64)


def main() -> None:
    rng = np.random.default_rng(20250515)
    cases = []
    for i, (n, f, d, kind) in enumerate(CASES):
        x = make_input(n, f, d, kind, rng)
        seed = 1000 + i
        out = {
            "n": n, "f": f, "d": d, "kind": kind, "seed": seed, "x": x.tolist(),
            "mda": byzfl.MDA(f)(x.copy()).tolist(),
            "monna_0": byzfl.MoNNA(f, 0)(x.copy()).tolist(),
            "monna_last": byzfl.MoNNA(f, n - 1)(x.copy()).tolist(),
            "meamed": byzfl.Meamed(f)(x.copy()).tolist(),
            "arc": byzfl.ARC(f)(x.copy()).tolist(),
            "clipping_2": byzfl.Clipping(2.0)(x.copy()).tolist(),
        }
        honest = x[: n - f].copy()  # the optimal attacks see the honest rows and add f copies of their vector
        for attack in ("ALittleIsEnough", "InnerProductManipulation"):
            key = "optimal_alie" if attack == "ALittleIsEnough" else "optimal_ipm"
            cls = getattr(byzfl, "Optimal_" + attack)
            out[key + "_meamed_arc"] = cls(agg=byzfl.Meamed(f), pre_agg_list=[byzfl.ARC(f)], f=f)(honest).tolist()
            out[key + "_trmean_clip"] = cls(
                agg=byzfl.TrMean(f), pre_agg_list=[byzfl.Clipping(2.0)], f=f, evals=15, start=0.5, delta=-3.0,
                ratio=0.7,
            )(honest).tolist()
        xt = torch.tensor(x, dtype=torch.float32)
        torch.manual_seed(seed)
        out["caf_power"] = byzfl.CAF(f)(xt.clone()).tolist()
        torch.manual_seed(seed)
        out["smea_power"] = byzfl.SMEA(f)(xt.clone()).tolist()
        cases.append(out)
    meta = {"byzfl": "0.0.11", "torch": torch.__version__, "numpy": np.__version__,
            "generator": "tests/data/make_byzfl_reference.py"}
    path = Path(__file__).with_name("byzfl_reference.json")
    path.write_text(json.dumps({"meta": meta, "cases": cases}) + "\n")
    print(f"wrote {path} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
