"""The ByzFL / Blades rules in byztrain.aggregators: ByzFL 0.0.11 reference values, exact-variant
references, preconditions, no mutation, and the registry binding (defense.name / defense.pre / params)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import byztrain
from byztrain import Config
from byztrain import aggregators as A
from byztrain import rules as R
from byztrain.config import ConfigError

REFERENCE = json.loads((Path(__file__).parent / "data" / "byzfl_reference.json").read_text())["cases"]
CASE_IDS = [f"n{c['n']}-f{c['f']}-d{c['d']}-{c['kind']}" for c in REFERENCE]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- ByzFL 0.0.11 reference values (tests/data/make_byzfl_reference.py) ----------------------------------

BYZFL_RULES = {
    "mda": lambda x, c: A.mda(x, c["f"]),
    "monna_0": lambda x, c: A.monna(x, c["f"]),
    "monna_last": lambda x, c: A.monna(x, c["f"], idx=c["n"] - 1),
    "meamed": lambda x, c: A.meamed(x, c["f"]),
    "arc": lambda x, c: A.arc(x, c["f"]),
    "clipping_2": lambda x, c: A.static_clipping(x, 2.0),
    # ByzFL draws the power-iteration start from the global torch RNG on float32 tensors
    "caf_power": lambda x, c: A.caf(x.float(), c["f"], eigen="power", generator=_gen(c["seed"]), tau_max_over="all"),
    "smea_power": lambda x, c: A.smea(x.float(), c["f"], eigen="power", generator=_gen(c["seed"])),
}


@pytest.mark.parametrize("case", REFERENCE, ids=CASE_IDS)
@pytest.mark.parametrize("rule", sorted(BYZFL_RULES))
def test_matches_byzfl_reference(case, rule):
    x = torch.tensor(case["x"], dtype=torch.float64)
    got = BYZFL_RULES[rule](x, case).double()
    expected = torch.tensor(case[rule], dtype=torch.float64)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-6


def test_reference_cases_have_outliers_that_matter():
    """The reference data must exercise robustness: the mean is far from every robust rule's output."""
    for case in REFERENCE:
        x = torch.tensor(case["x"], dtype=torch.float64)
        assert float((x.mean(0) - torch.tensor(case["mda"])).norm()) > 0.5


# ---- exact variants against brute force -----------------------------------------------------------------


def _cov_top(rows: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones(len(rows)) if w is None else w
    mu = (w[:, None] * rows).sum(0) / w.sum()
    d = rows - mu
    cov = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / w.sum()
    return float(np.linalg.eigvalsh(cov)[-1])


@pytest.mark.parametrize("seed", range(4))
def test_smea_exact_is_brute_force_argmin_of_covariance_eigenvalue(seed):
    rng = np.random.default_rng(seed)
    n, f, d = 8, 3, 5
    x = rng.normal(size=(n, d))
    x[:f] += rng.normal(scale=4.0, size=(f, d))
    best = min(itertools.combinations(range(n), n - f), key=lambda s: _cov_top(x[list(s)]))
    got = A.smea(torch.from_numpy(x), f)
    assert torch.allclose(got, torch.from_numpy(x[list(best)].mean(0)), atol=1e-12)


def _caf_naive(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    c = np.ones(n)
    best, best_mu = math.inf, None
    while c.sum() > n - 2 * f:
        mu = (c[:, None] * x).sum(0) / c.sum()
        d = x - mu
        cov = (c[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / c.sum()
        lam, vecs = np.linalg.eigh(cov)
        if lam[-1] < best:
            best, best_mu = lam[-1], mu
        tau = (d @ vecs[:, -1]) ** 2
        c = np.clip(c * (1 - tau / tau[c > 0].max()), 0, None)
    return best_mu


@pytest.mark.parametrize("seed", range(4))
def test_caf_exact_matches_naive_covariance_filter(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(9, 4))
    x[:3] = 20.0 + rng.normal(size=(3, 4))
    got = A.caf(torch.from_numpy(x), 3)
    assert np.allclose(got.numpy(), _caf_naive(x, 3), atol=1e-9)


def test_caf_weighted_filter_ends_fast_against_a_huge_outlier():
    """ByzFL's all-rows max stalls here (the zeroed outlier's tau dominates); the default ends in <= n rounds."""
    g = _gen(0)
    honest = torch.randn(6, 50, generator=g, dtype=torch.float64)
    x = torch.cat([honest, -1000 * honest[:1]])
    got = A.caf(x, 1)
    assert float((got - honest.mean(0)).norm()) < float((x.mean(0) - honest.mean(0)).norm()) / 100


def test_mda_picks_the_tightest_subset():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]], dtype=torch.float64)
    assert A.mda(x, 2).item() == 1.0  # {0, 1, 2} has diameter 2; any set with 10 or 11 is wider


def test_meamed_hand_values():
    x = torch.tensor([[1.0, 0.0], [2.0, 5.0], [3.0, 6.0], [100.0, 7.0], [4.0, -50.0]], dtype=torch.float64)
    # col 0: median 3, nearest three 2, 3, 4; col 1: median 5, nearest three 5, 6, 7
    assert A.meamed(x, 2).tolist() == [3.0, 6.0]


def test_monna_centres_on_idx():
    x = torch.tensor([[0.0], [1.0], [5.0], [6.0], [7.0]], dtype=torch.float64)
    assert A.monna(x, 2, idx=0).item() == pytest.approx(2.0)  # {0, 1, 5}
    assert A.monna(x, 2, idx=4).item() == pytest.approx(6.0)  # {5, 6, 7}


def test_arc_clips_the_k_largest_to_the_next_norm():
    n, f = 10, 3  # k = floor(2 * 3 * 7 / 10) = 4
    scales = torch.arange(1, n + 1, dtype=torch.float64)
    x = scales[:, None] * torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    out = A.arc(x, f)
    norms = out.norm(dim=1)
    assert torch.allclose(norms[:6], scales[:6]) and torch.allclose(norms[6:], torch.full((4,), 6.0, dtype=torch.float64))
    assert torch.allclose(out / norms[:, None], x / x.norm(dim=1, keepdim=True))
    assert torch.equal(A.arc(x, 0), x)  # k = 0: unchanged


def test_clipping_sends_inf_rows_along_their_limit_direction():
    x = torch.tensor([[math.inf, 1.0, -math.inf], [3.0, 4.0, 0.0]])
    out = A.static_clipping(x, 1.0)
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0, -1.0]) / math.sqrt(2))
    assert torch.allclose(out[1], torch.tensor([0.6, 0.8, 0.0]))


# ---- the Blades-style rules on a clear-cut attack --------------------------------------------------------


def _honest_and_flipped(n=11, f=2, d=200, seed=0, dtype=torch.float64):
    g = _gen(seed)
    common = torch.randn(d, generator=g, dtype=dtype)
    honest = common + 0.3 * torch.randn(n - f, d, generator=g, dtype=dtype)
    return honest, torch.cat([honest, (-5.0 * common).expand(f, d)])


@pytest.mark.parametrize("rule", ["bulyan", "dnc", "clipped_clustering", "sign_guard"])
def test_blades_rules_discard_sign_flipped_rows(rule):
    honest, x = _honest_and_flipped()
    out = {
        "bulyan": lambda: A.bulyan(x, 2),
        "dnc": lambda: A.dnc(x, 2, _gen(1), sub_dim=50),
        "clipped_clustering": lambda: A.clipped_clustering(x),
        "sign_guard": lambda: A.sign_guard(x, _gen(1)),
    }[rule]()
    # the flipped rows would pull the mean 2/11 * 6 |common| away; the rules stay near the honest mean
    assert float((out - honest.mean(0)).norm()) < 0.2 * float((x.mean(0) - honest.mean(0)).norm())


def test_dnc_keeps_exactly_the_honest_rows():
    honest, x = _honest_and_flipped()
    assert torch.allclose(A.dnc(x, 2, _gen(3)), honest.mean(0))


def test_dnc_and_sign_guard_are_functions_of_the_generator_seed():
    _, x = _honest_and_flipped()
    assert torch.equal(A.dnc(x, 2, _gen(5), sub_dim=20), A.dnc(x, 2, _gen(5), sub_dim=20))
    assert torch.equal(A.sign_guard(x, _gen(5)), A.sign_guard(x, _gen(5)))


# ---- preconditions and no mutation -------------------------------------------------------------------------


def _all_new_rules(n, f):
    return {
        "mda": lambda x: A.mda(x, f),
        "monna": lambda x: A.monna(x, f, idx=n - 1),
        "meamed": lambda x: A.meamed(x, f),
        "caf": lambda x: A.caf(x, f),
        "caf_power": lambda x: A.caf(x, f, eigen="power", generator=_gen(0)),
        "smea": lambda x: A.smea(x, f),
        "smea_power": lambda x: A.smea(x, f, eigen="power", generator=_gen(0)),
        "bulyan": lambda x: A.bulyan(x, 1),
        "dnc": lambda x: A.dnc(x, f, _gen(0), sub_dim=3),
        "sign_guard": lambda x: A.sign_guard(x, _gen(0)),
        "clipped_clustering": lambda x: A.clipped_clustering(x),
        "arc": lambda x: A.arc(x, f),
        "clipping": lambda x: A.static_clipping(x, 0.5),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", sorted(_all_new_rules(7, 2)))
def test_inputs_unchanged_and_dtype_kept(rule, dtype):
    x = torch.randn(8, 6, generator=_gen(2), dtype=dtype) * torch.arange(1, 9, dtype=dtype)[:, None]
    before = x.clone()
    out = _all_new_rules(8, 2)[rule](x)
    assert torch.equal(x, before)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert out.shape == ((8, 6) if rule in ("arc", "clipping") else (6,))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: A.mda(x, 3), r"mda needs n > 2f \(n=6, f=3\)"),
        (lambda x: A.smea(x, 3), r"smea needs n > 2f"),
        (lambda x: A.caf(x, 3), r"caf needs n > 2f"),
        (lambda x: A.meamed(x, 3), r"meamed needs n > 2f"),
        (lambda x: A.monna(x, 1, idx=6), r"monna needs idx < n \(n=6, idx=6\)"),
        (lambda x: A.bulyan(x, 1), r"bulyan needs n >= 4f \+ 3 \(n=6, f=1\)"),
        (lambda x: A.dnc(x, 4, _gen(0), filter_frac=2.0), r"dnc needs n - floor\(filter_frac \* f\) >= 1"),
        (lambda x: A.dnc(x, 1, None), r"dnc: generator must be a torch.Generator"),
        (lambda x: A.smea(x, 1, eigen="power"), r"smea with eigen='power' needs a torch.Generator"),
        (lambda x: A.caf(x, 1, eigen="svd"), r"caf: eigen must be one of 'exact', 'power'"),
        (lambda x: A.sign_guard(x, _gen(0), low=4.0), r"sign_guard needs low <= high"),
        (lambda x: A.arc(x, 6), r"arc needs f < n \(n=6, f=6\)"),
        (lambda x: A.static_clipping(x, -1.0), r"clipping: c must be >= 0"),
        (lambda x: A.caf(torch.cat([x[:5], torch.full((1, 3), math.inf)]), 1), r"caf: x must be finite"),
        (lambda x: A.mda(x[:, 0], 1), r"mda: x must be a 2-D tensor"),
    ],
)
def test_precondition_errors(call, match):
    x = torch.randn(6, 3, generator=_gen(0))
    with pytest.raises(ValueError, match=match):
        call(x)


def test_subset_rules_refuse_sizes_past_a_minute_of_work():
    x = torch.zeros(40, 2)
    with pytest.raises(ValueError, match=r"C\(40, 19\) = 131282408400 subsets"):
        A.mda(x, 19)
    with pytest.raises(ValueError, match=r"smea enumerates C\(n, f\)"):
        A.smea(x, 19)
    with pytest.raises(ConfigError, match="more than a minute") as err:
        R.build_aggregator("mda", f=19, tau=1.0, params=None, n=40)
    assert err.value.field == "defense.f"


# ---- registry and config -------------------------------------------------------------------------------------


NEW = ["mda", "monna", "meamed", "caf", "smea", "bulyan", "dnc", "sign_guard", "clipped_clustering"]


def test_registry_has_every_new_rule():
    assert set(NEW) <= set(R.AGGREGATORS) and {"arc", "clipping"} <= set(R.PRE_AGGREGATORS)


@pytest.mark.parametrize(
    "name, params, field, match",
    [
        ("bulyan", {}, "defense.f", r"n >= 4f \+ 3"),
        ("mda", {"_f": 4}, "defense.f", r"n > 2f"),
        ("monna", {"idx": 9}, "defense.params.idx", r"idx < n"),
        ("monna", {"idx": -1}, "defense.params.idx", r"integer >= 0"),
        ("caf", {"eigen": "svd"}, "defense.params.eigen", r"'exact', 'power'"),
        ("caf", {"tau_max_over": "some"}, "defense.params.tau_max_over", r"'weighted', 'all'"),
        ("dnc", {"sub_dim": 0}, "defense.params.sub_dim", r"integer >= 1"),
        ("dnc", {"filter_frac": 5.0}, "defense.params.filter_frac", r">= 1"),
        ("sign_guard", {"coord_frac": 2.0}, "defense.params.coord_frac", r"> 0 and <= 1"),
        ("sign_guard", {"low": 5.0}, "defense.params.low", r"<= high"),
        ("clipped_clustering", {"max_tau": 0}, "defense.params.max_tau", r"finite number > 0"),
        ("smea", {"idx": 1}, "defense.params.idx", r"unknown parameter for 'smea'"),
    ],
)
def test_build_aggregator_config_errors(name, params, field, match):
    params = dict(params)
    f = params.pop("_f", 3)
    with pytest.raises(ConfigError, match=match) as err:
        R.build_aggregator(name, f=f, tau=1.0, params=params, n=7, generator=_gen(0))
    assert err.value.field == field


@pytest.mark.parametrize("name", NEW)
def test_bound_rule_matches_function(name):
    x = torch.randn(11, 5, generator=_gen(4), dtype=torch.float64)
    bound = R.build_aggregator(name, f=2, tau=1.0, params=None, n=11, generator=_gen(9))
    direct = _all_new_rules(11, 2)[name] if name not in ("dnc", "sign_guard", "monna", "bulyan") else {
        "bulyan": lambda x: A.bulyan(x, 2),
        "dnc": lambda x: A.dnc(x, 2, _gen(9)),
        "sign_guard": lambda x: A.sign_guard(x, _gen(9)),
        "monna": lambda x: A.monna(x, 2),
    }[name]
    assert torch.equal(bound(x), direct(x))


def test_pre_aggregators_bind_and_validate():
    x = torch.randn(7, 4, generator=_gen(0)) * 10
    clip = R.build_pre_aggregator("clipping", f=0, params={"c": 1.5}, generator=None)
    assert torch.allclose(clip(x).norm(dim=1), torch.full((7,), 1.5))
    assert torch.equal(R.build_pre_aggregator("arc", f=2, params=None, generator=None)(x), A.arc(x, 2))
    with pytest.raises(ConfigError) as err:
        R.build_pre_aggregator("clipping", f=0, params={"c": -1}, generator=None)
    assert err.value.field == "defense.params.c"
    with pytest.raises(ConfigError) as err:
        R.build_pre_aggregator("arc", f=7, params=None, generator=None, n=7)
    assert err.value.field == "defense.f"


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"peers": 7, "byzantine": 2, "defense": {"name": "bulyan"}})
    assert err.value.field == "defense.f"
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"peers": 7, "byzantine": 1, "defense": {"name": "dnc", "params": {"iters": 0}}})
    assert err.value.field == "defense.params.iters"
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"peers": 7, "defense": {"name": "mean", "pre": ["arcc"]}})
    assert err.value.field == "defense.pre" and "did you mean 'arc'" in str(err.value)


@pytest.mark.parametrize("name, pre", [(n, []) for n in NEW] + [("mean", ["arc"]), ("meamed", ["clipping", "arc"])])
def test_every_new_rule_runs_end_to_end(synthetic, one_thread, tmp_path, name, pre):
    cfg = Config.from_dict({
        "name": "t", "peers": 7, "byzantine": 1, "attack": {"name": "sign_flip"},
        "defense": {"name": name, "pre": pre, "params": {"c": 5.0} if "clipping" in pre else {}},
        "train": {"steps": 3, "eval_every": 3, "batch_size": 16},
        "log": {"out": str(tmp_path), "every": 3, "tensorboard": False},
    })
    summary = byztrain.run(cfg, quiet=True)
    assert summary["steps"] == 3 and math.isfinite(summary["final_test_accuracy"])
