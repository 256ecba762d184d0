"""The attack catalogue: each attack's defining property, parameter errors, the window, combinations, and one
end-to-end run per family through the real runtime (tiny IDX fixture, mean defense)."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import byztrain
from byztrain import Config
from byztrain.attacks import ATTACKS, AttackContext, attack_active, build_attack
from byztrain.attacks.omniscient import z_max
from byztrain.config import ConfigError
from byztrain.runtime.keyfile import key_path

N, BYZ = 16, (1, 3, 5, 7, 9, 11, 13)
HONEST = tuple(p for p in range(N) if p not in BYZ)


def ctx(step=1, peer=1, active=tuple(range(N)), byzantine=BYZ, num_classes=10, seed=0, **extra):
    return AttackContext(
        step=step,
        peer=peer,
        run_seed=seed,
        byzantine=tuple(byzantine),
        active=tuple(active),
        num_classes=num_classes,
        shared_generator=torch.Generator().manual_seed(1234 + step),
        extra=dict(extra),
    )


def make(name, params=None, peer=1, train=None, **window):
    cfg = Config.from_dict({"byzantine": 7, "attack": {"name": name, **window}, "train": train or {}})
    return ATTACKS[name].obj(dict(params or {}), cfg, peer)


def honest_grads(h=9, d=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) + 0.5 * torch.randn(h, d, generator=g)


# ---- gradient attacks ---------------------------------------------------------------------------


def test_sign_flip_scales_by_minus_1000_and_scale_is_a_param():
    g = torch.randn(20)
    assert torch.equal(make("sign_flip").on_gradient(g, ctx()), g * -1000.0)
    assert torch.equal(make("sign_flip", {"scale": -1}).on_gradient(g, ctx()), -g)


def test_random_direction_is_shared_constant_and_1000x_norm():
    g1, g2 = torch.randn(300), 3 * torch.randn(300)
    a, b = make("random_direction", peer=1), make("random_direction", peer=5)
    v1, v2 = a.on_gradient(g1, ctx(peer=1)), b.on_gradient(g2, ctx(peer=5))
    assert torch.allclose(v1.norm(), 1000 * g1.norm(), rtol=1e-5)
    assert torch.allclose(v2.norm(), 1000 * g2.norm(), rtol=1e-5)
    u1, u2 = v1 / v1.norm(), v2 / v2.norm()
    assert torch.allclose(u1, u2, atol=1e-6)  # one direction for every attacker
    later = a.on_gradient(g2, ctx(step=50, peer=1))
    assert torch.allclose(later / later.norm(), u1, atol=1e-6)  # and for every step
    assert torch.allclose(later, v2)  # same g -> identical vector across attackers
    other_run = make("random_direction").on_gradient(g1, ctx(seed=1))
    assert not torch.allclose(other_run, v1)
    fixed = make("random_direction", {"seed": 0}).on_gradient(g1, ctx(seed=1))
    assert torch.allclose(fixed, v1)  # `seed` overrides the run seed


def test_small_change_is_relative_epsilon_and_fresh_per_step():
    g = torch.randn(500)
    a = make("small_change")
    v1, v2 = a.on_gradient(g, ctx(step=1)), a.on_gradient(g, ctx(step=2))
    assert math.isclose(float((v1 - g).norm()), 0.05 * float(g.norm()), rel_tol=1e-4)
    assert not torch.allclose(v1, v2)
    v = make("small_change", {"epsilon": 0.2}).on_gradient(g, ctx(step=1))
    assert math.isclose(float((v - g).norm()), 0.2 * float(g.norm()), rel_tol=1e-4)
    assert torch.equal(make("small_change").on_gradient(g, ctx(step=1)), v1)  # deterministic


# ---- data attacks -------------------------------------------------------------------------------


def test_label_flip_maps_y_to_c_minus_1_minus_y():
    x, y = torch.randn(10, 1, 2, 2), torch.arange(10)
    x2, y2 = make("label_flip").on_batch(x, y, ctx())
    assert x2 is x
    assert y2.tolist() == [9 - i for i in range(10)]
    _, y3 = make("label_flip").on_batch(x, torch.tensor([0, 1, 2]), ctx(num_classes=3))
    assert y3.tolist() == [2, 1, 0]


def test_label_shuffle_keeps_multiset_changes_pairing_new_per_step():
    x, y = torch.randn(64, 1, 2, 2), torch.arange(64) % 10
    a = make("label_shuffle")
    _, y1 = a.on_batch(x, y, ctx(step=1))
    _, y2 = a.on_batch(x, y, ctx(step=2))
    assert sorted(y1.tolist()) == sorted(y.tolist())
    assert (y1 != y).float().mean() > 0.5
    assert not torch.equal(y1, y2)
    assert torch.equal(a.on_batch(x, y, ctx(step=1))[1], y1)  # seeded: replayable
    assert torch.equal(y, torch.arange(64) % 10)  # input untouched


# ---- temporal -----------------------------------------------------------------------------------


def drive_delayed(attack, steps, dim=4):
    """Run the runtime's hook order for `steps` steps; returns {step: sent} and the max buffer sizes."""
    sent, peak_during, peak_between = {}, 0, 0
    for t in range(1, steps + 1):
        g = torch.full((dim,), float(t))
        attack.observe_true_gradient(g, t)
        peak_during = max(peak_during, len(attack.buffer))
        g.fill_(-1.0)  # the runtime reuses the buffer: the attack must have copied it
        if attack_active(attack.config, t):
            sent[t] = attack.on_gradient(torch.full((dim,), float(t)), ctx(step=t))
        peak_between = max(peak_between, len(attack.buffer))
    return sent, peak_during, peak_between


def test_delayed_gradient_sends_exactly_delay_steps_back_with_bounded_memory():
    a = make("delayed_gradient", {"delay": 5}, start=3, train={"steps": 60})
    sent, during, between = drive_delayed(a, 60)
    assert set(sent) == set(range(3, 61))
    for t, v in sent.items():
        expected = t - 5 if t > 5 else 1  # warm-up: the oldest gradient held (step 1)
        assert torch.equal(v, torch.full((4,), float(expected))), (t, v)
    assert during <= 6 and between <= 5


def test_delayed_gradient_warmup_honest_and_every():
    a = make("delayed_gradient", {"delay": 4, "warmup": "honest"}, start=1, every=3, train={"steps": 40})
    sent, _, between = drive_delayed(a, 40)
    for t, v in sent.items():
        assert torch.equal(v, torch.full((4,), float(t - 4 if t > 4 else t)))
    assert between <= 2  # only steps t with t + 4 an attack step (every 3rd) are kept


def test_delayed_gradient_keeps_only_needed_steps():
    # Bounded window: attack steps 30..34 need steps 20..24 only; memory does not grow with `delay`.
    a = make("delayed_gradient", {"delay": 10}, start=30, stop=35, train={"steps": 100})
    sent, during, _ = drive_delayed(a, 100)
    assert during <= 6
    assert [float(v[0]) for v in sent.values()] == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert len(a.buffer) == 0
    # Default delay (1000) in a 300-step run attacked from 200: nothing is ever 1000 steps old, so only the
    # oldest gradient (step 1) is held and sent.
    b = make("delayed_gradient", start=200, train={"steps": 300})
    sent, during, _ = drive_delayed(b, 300)
    assert during == 1 and all(float(v[0]) == 1.0 for v in sent.values())


@settings(max_examples=40, deadline=None)
@given(
    delay=st.integers(1, 12),
    start=st.integers(0, 30),
    length=st.one_of(st.none(), st.integers(1, 20)),
    every=st.integers(1, 4),
    warmup=st.sampled_from(["oldest", "honest"]),
)
def test_delayed_gradient_property(delay, start, length, every, warmup):
    stop = None if length is None else start + length
    a = make("delayed_gradient", {"delay": delay, "warmup": warmup}, start=start, stop=stop, every=every,
             train={"steps": 45})
    sent, during, between = drive_delayed(a, 45)
    assert during <= delay + 1 and between <= delay
    first = 1
    for t, v in sent.items():
        if t - delay >= 1:
            expected = t - delay
        else:
            expected = first if warmup == "oldest" else t
        assert float(v[0]) == expected


# ---- omniscient ---------------------------------------------------------------------------------


def test_ipm_is_minus_epsilon_mean_with_negative_inner_product():
    h = honest_grads()
    mean = h.mean(0)
    v = make("ipm").omniscient(h, ctx())
    assert torch.allclose(v, -0.1 * mean)
    assert float(v @ mean) < 0
    assert torch.allclose(make("ipm_0.6").omniscient(h, ctx()), -0.6 * mean)
    assert torch.allclose(make("ipm", {"epsilon": 0.6}).omniscient(h, ctx()), -0.6 * mean)


def test_alie_z_max_and_definition():
    assert z_max(16, 7) == pytest.approx(1.1503, abs=1e-4)
    assert z_max(16, 3) == pytest.approx(0.3186, abs=1e-4)
    assert math.isfinite(z_max(16, 12)) and math.isfinite(z_max(16, 0))
    h = honest_grads()
    a = make("alie")
    assert a.z(ctx()) == pytest.approx(1.1503, abs=1e-4)
    v = a.omniscient(h, ctx())
    assert torch.allclose(v, h.mean(0) - z_max(16, 7) * h.std(0, correction=1), atol=1e-6)
    v0 = make("alie", {"ddof": 0}).omniscient(h, ctx())
    assert torch.allclose(v0, h.mean(0) - z_max(16, 7) * h.std(0, correction=0), atol=1e-6)
    vz = make("alie", {"z": 1.5}).omniscient(h, ctx())
    assert torch.allclose(vz, h.mean(0) - 1.5 * h.std(0), atol=1e-6)
    # n and b are this step's active peers: after bans z changes
    assert make("alie").z(ctx(active=range(12), byzantine=(1, 3, 5))) == pytest.approx(z_max(12, 3))
    assert torch.equal(a.omniscient(h[:1], ctx()), h[0])
    assert a.omniscient(h[:0], ctx()) is None


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(2, 8),
    d=st.integers(1, 30),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(["min_max", "min_sum"]),
)
def test_min_max_min_sum_always_feasible(h, d, seed, name):
    hon = honest_grads(h=h, d=d, seed=seed).double()
    v = make(name).omniscient(hon, ctx()).double()
    d2 = torch.cdist(hon, hon).pow(2)
    dist2 = (hon - v).pow(2).sum(1)
    if name == "min_max":
        assert float(dist2.max()) <= float(d2.max()) * (1 + 1e-9) + 1e-12
    else:
        assert float(dist2.sum()) <= float(d2.sum(1).max()) * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
@pytest.mark.parametrize("direction", ["std", "unit_vec", "sign"])
def test_min_max_min_sum_respect_constraint_and_are_maximal(name, direction):
    h = honest_grads(h=9, d=200, seed=3).double()
    d2 = torch.cdist(h, h).pow(2)

    def excess(v):  # constraint value / bound: <= 1 means feasible
        dist2 = (h - v).pow(2).sum(1)
        if name == "min_max":
            return float(dist2.max() / d2.max())
        return float(dist2.sum() / d2.sum(1).max())

    binary = make(name, {"direction": direction})
    exact = make(name, {"direction": direction, "search": "exact"})
    mean = h.mean(0)
    p = binary.perturbation(h, mean)
    assert float(p.norm()) == pytest.approx(1.0)
    g_bin, g_ex = binary.gamma(h, mean, p), exact.gamma(h, mean, p)
    assert g_ex > 0
    assert g_bin <= g_ex and g_bin == pytest.approx(g_ex, rel=1e-5)  # maximal up to tol = 1e-6
    assert excess(mean + g_bin * p) <= 1 + 1e-12
    assert excess(mean + g_ex * p) == pytest.approx(1.0, abs=1e-9)  # the constraint is tight at gamma*
    assert excess(mean + g_ex * 1.001 * p) > 1
    v = binary.omniscient(h.float(), ctx())
    assert v.dtype == torch.float32 and excess(v.double()) <= 1 + 1e-5
    if direction == "std":
        assert torch.allclose(v.double(), mean - g_bin * h.std(0) / h.std(0).norm(), atol=1e-5)


def test_min_max_degenerate_inputs():
    h = torch.ones(5, 7)
    assert torch.equal(make("min_max").omniscient(h, ctx()), torch.ones(7))
    assert torch.equal(make("min_sum").omniscient(h[:1], ctx()), torch.ones(7))


def test_mimic_copies_one_honest_peer():
    h = honest_grads()
    ids = HONEST
    a = make("mimic")
    v = a.omniscient(h, ctx(honest_peers=ids))
    assert any(torch.equal(v, row) for row in h)
    assert torch.equal(v, h[0])  # the lowest-numbered honest sender (peer 0)
    shuffled = ids[::-1]  # rows in another order: still the peer with the lowest id
    assert torch.equal(a.omniscient(h, ctx(honest_peers=shuffled)), h[-1])
    assert torch.equal(make("mimic", {"target": 6}).omniscient(h, ctx(honest_peers=ids)), h[ids.index(6)])
    assert torch.equal(make("mimic", {"target": 3}).omniscient(h, ctx(honest_peers=ids)), h[0])  # 3 is Byzantine
    assert torch.equal(a.omniscient(h, ctx()), h[0])  # without ids: row 0


@pytest.mark.parametrize("name", ["ipm", "ipm_0.6", "alie", "min_max", "min_sum", "mimic"])
def test_omniscient_attackers_collude_on_one_vector(name):
    h = honest_grads()
    vs = [make(name, peer=p).omniscient(h, ctx(peer=p, honest_peers=HONEST)) for p in BYZ]
    assert all(torch.equal(vs[0], v) for v in vs[1:])
    assert ATTACKS[name].obj.is_omniscient


# ---- protocol attacks ---------------------------------------------------------------------------


def proto(name, params=None, peer=1):
    cfg = Config.from_dict({"byzantine": 7, "defense": {"name": "btard"}, "attack": {"name": name}})
    return ATTACKS[name].obj(dict(params or {}), cfg, peer)


def test_protocol_attacks_need_btard():
    for name in ("bad_aggregation", "false_accusation", "lie_in_check", "mprng_withhold", "silent"):
        assert ATTACKS[name].obj.requires_defense == ("btard",)
        with pytest.raises(ConfigError) as e:
            Config.from_dict({"byzantine": 7, "attack": {"name": name}})
        assert e.value.field == "attack.name"


def test_bad_aggregation_shifts_by_relative_size():
    value = torch.randn(3, 40)
    out = proto("bad_aggregation").on_aggregate(2, value, ctx())
    assert out.shape == value.shape
    assert float((out - value).norm()) == pytest.approx(1e-2 * float(value.norm()), rel=1e-4)
    out2 = proto("bad_aggregation", {"size": 0.5}).on_aggregate(2, value, ctx())
    assert float((out2 - value).norm()) == pytest.approx(0.5 * float(value.norm()), rel=1e-4)


def test_false_accusation_targets_an_honest_peer():
    a = proto("false_accusation")
    targets = set()
    for step in range(1, 60):
        acc = a.accusations(ctx(step=step, peer=1))
        assert len(acc) == 1
        target, reason = acc[0]
        assert target in HONEST and isinstance(reason, str)
        targets.add(target)
    assert len(targets) > 3
    assert proto("false_accusation", {"rate": 0.0}).accusations(ctx()) == []
    some = sum(bool(proto("false_accusation", {"rate": 0.5}).accusations(ctx(step=s))) for s in range(200))
    assert 60 < some < 140
    assert a.accusations(ctx(active=BYZ)) == []  # nobody honest left to accuse


def test_lie_in_check_mprng_withhold_silent():
    s, d = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    s2, d2 = proto("lie_in_check").on_check_scalars(s, d, ctx())
    assert torch.allclose(s2, s * 1.1) and torch.equal(d2, d)
    s3, d3 = proto("lie_in_check", {"scalars": "both", "size": 0.5}).on_check_scalars(s, d, ctx())
    assert torch.allclose(s3, s * 1.5) and torch.allclose(d3, d * 1.5)
    assert proto("mprng_withhold").on_mprng_reveal(b"secret", ctx()) is None
    parts = {0: torch.ones(2)}
    assert proto("silent").on_send_parts(parts, ctx()) is None
    # honest elsewhere
    assert proto("silent").on_gradient(torch.ones(2), ctx()).tolist() == [1.0, 1.0]
    assert proto("mprng_withhold").on_send_parts(parts, ctx()) is parts


# ---- parameters, window, combinations ------------------------------------------------------------


def test_unknown_param_names_the_key_with_a_hint():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"byzantine": 7, "attack": {"name": "ipm", "params": {"epsilom": 0.2}}})
    assert e.value.field == "attack.params.epsilom"
    assert "epsilon" in str(e.value)


@pytest.mark.parametrize(
    "name,params,key",
    [
        ("sign_flip", {"scale": "big"}, "scale"),
        ("sign_flip", {"scale": True}, "scale"),
        ("random_direction", {"seed": 1.5}, "seed"),
        ("small_change", {"epsilon": -0.1}, "epsilon"),
        ("delayed_gradient", {"delay": 0}, "delay"),
        ("delayed_gradient", {"delay": 2.5}, "delay"),
        ("delayed_gradient", {"warmup": "newest"}, "warmup"),
        ("ipm", {"epsilon": 0}, "epsilon"),
        ("alie", {"z": "max"}, "z"),
        ("alie", {"ddof": 2}, "ddof"),
        ("min_max", {"direction": "up"}, "direction"),
        ("min_sum", {"search": "golden"}, "search"),
        ("min_max", {"tol": 0}, "tol"),
        ("mimic", {"target": -1}, "target"),
    ],
)
def test_bad_param_values(name, params, key):
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"byzantine": 7, "attack": {"name": name, "params": params}})
    assert e.value.field == f"attack.params.{key}"


@pytest.mark.parametrize(
    "name,params,key",
    [
        ("false_accusation", {"rate": 1.5}, "rate"),
        ("bad_aggregation", {"size": 0}, "size"),
        ("lie_in_check", {"scalars": "z"}, "scalars"),
        ("mprng_withhold", {"rate": 1}, "rate"),
    ],
)
def test_bad_protocol_param_values(name, params, key):
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"byzantine": 7, "defense": {"name": "btard"}, "attack": {"name": name, "params": params}})
    assert e.value.field == f"attack.params.{key}"


def test_attack_window_start_stop_every():
    cfg = Config.from_dict({"byzantine": 1, "attack": {"name": "sign_flip", "start": 3, "stop": 12, "every": 4}})
    assert [t for t in range(1, 20) if attack_active(cfg, t)] == [3, 7, 11]
    cfg = Config.from_dict({"byzantine": 1, "attack": {"name": "sign_flip", "start": 0}})
    assert all(attack_active(cfg, t) for t in range(1, 5))


def test_combined_attack_chains_hooks():
    cfg = Config.from_dict({
        "byzantine": 7,
        "attack": {"name": "label_flip+sign_flip", "params": {"sign_flip": {"scale": -2}}},
    })
    a = build_attack(cfg, 1)
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 9])
    assert a.on_batch(x, y, ctx())[1].tolist() == [9, 8, 0]
    assert a.on_gradient(torch.ones(2), ctx()).tolist() == [-2.0, -2.0]
    cfg = Config.from_dict({"byzantine": 7, "defense": {"name": "btard"}, "attack": {"name": "alie+silent"}})
    b = build_attack(cfg, 1)
    assert b.is_omniscient and b.on_send_parts({0: torch.ones(1)}, ctx()) is None
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"byzantine": 7, "attack": {"name": "ipm+alie", "params": {"epsilon": 1}}})
    assert e.value.field == "attack.params.epsilon"


# ---- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 240/60-image Fashion-MNIST-shaped IDX fixture (canonical file names, raw uint8)."""
    from byztrain.tasks.idx import write_idx

    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 240), ("t10k", 60)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = (rng.integers(0, 40, (n, 28, 28)) + 20 * y[:, None, None]).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", x, compress=False)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y, compress=False)
    return root


GRADIENT_DATA_ATTACKS = [
    ("sign_flip", {}),
    ("random_direction", {}),
    ("small_change", {}),
    ("label_flip", {}),
    ("label_shuffle", {}),
    ("delayed_gradient", {"delay": 2}),
    ("ipm", {}),
    ("alie", {}),
    ("min_max", {}),
    ("min_sum", {}),
    ("mimic", {}),
]


def _tiny_run(out, data, attack):
    cfg = Config.from_dict({
        "name": attack["name"],
        "peers": 5,
        "byzantine": 2,
        "task": {"data_dir": str(data)},
        "attack": attack,
        "defense": {"name": "mean"},
        "train": {"steps": 4, "eval_every": 4, "batch_size": 8},
        "runtime": {"threads": 1},  # the test machine is shared: avoid thread oversubscription
        "log": {"out": str(out), "every": 1, "tensorboard": False},
    })
    summary = byztrain.run(cfg, quiet=True)
    norms = [r["update_norm"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["step"] >= 1]
    return summary, norms


@pytest.fixture(scope="module")
def clean_norms(tiny_data, tmp_path_factory):
    # Same Byzantine peers, attack window after the run: every peer honest.
    return _tiny_run(tmp_path_factory.mktemp("clean"), tiny_data, {"name": "sign_flip", "start": 100})[1]


@pytest.mark.parametrize("name,params", GRADIENT_DATA_ATTACKS, ids=[n for n, _ in GRADIENT_DATA_ATTACKS])
def test_runs_end_to_end_with_mean(tmp_path, tiny_data, clean_norms, name, params):
    summary, norms = _tiny_run(tmp_path, tiny_data, {"name": name, "start": 2, "params": params})
    assert len(norms) == 4
    assert norms[0] == clean_norms[0]  # step 1: before the attack window, identical to the clean run
    assert all(a != c for a, c in zip(norms[1:], clean_norms[1:], strict=True))  # from step 2 on, the attack acts
    assert summary["steps"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["byzantine_peers"] == summary["byzantine_peers"]
    assert len(summary["byzantine_peers"]) == 2 and 0 not in summary["byzantine_peers"]
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["bad_aggregation", "false_accusation", "lie_in_check", "mprng_withhold", "silent"])
def test_protocol_attack_gets_its_attackers_banned_under_btard(tmp_path, tiny_data, name):
    # a fixed MPRNG key in the run folder: who validates whom, hence the ban steps below, replay exactly
    key_path(tmp_path).write_text(hashlib.sha256(b"test_attacks").hexdigest() + "\n")
    cfg = Config.from_dict({
        "name": name,
        "peers": 6,  # btard needs byzantine < (peers - validators) / 2
        "byzantine": 2,
        "task": {"data_dir": str(tiny_data)},
        "attack": {"name": name, "start": 2},
        "defense": {"name": "btard"},
        "train": {"steps": 4, "eval_every": 4, "batch_size": 8},
        "runtime": {"threads": 1},
        "log": {"out": str(tmp_path), "every": 1, "tensorboard": False},
    })
    summary = byztrain.run(cfg, quiet=True)
    assert sorted(int(p) for p in summary["banned"]) == summary["byzantine_peers"]
    # Banned once they act (from step 2); an attacker drawn as validator at step 2 acts at step 3.
    assert all(2 <= step <= 3 for step in summary["banned"].values())
    assert summary["honest_banned"] == 0


def test_colluding_omniscient_attackers_share_one_crafted_vector(tmp_path, tiny_data, monkeypatch):
    """ALIE is crafted once per step for all attackers (one (class, params) -> one vector), not once each."""
    from byztrain.attacks.omniscient import ALIE, honest_std

    h = honest_grads(h=9, d=1000, seed=5)
    for ddof in (0, 1):
        assert torch.allclose(honest_std(h, ddof), h.std(0, correction=ddof), rtol=1e-5, atol=1e-7)
    calls = []
    original = ALIE.craft
    monkeypatch.setattr(ALIE, "craft", lambda self, honest, c: calls.append(c.step) or original(self, honest, c))
    cfg = Config.from_dict({
        "peers": 8,
        "byzantine": 3,
        "task": {"data_dir": str(tiny_data)},
        "attack": {"name": "alie", "start": 2},
        "train": {"steps": 4, "eval_every": 4, "batch_size": 8},
        "runtime": {"threads": 1},
        "log": {"out": str(tmp_path), "every": 1, "tensorboard": False},
    })
    byztrain.run(cfg, quiet=True)
    assert calls == [2, 3, 4]  # three attackers, one craft per attacked step
