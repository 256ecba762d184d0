"""train.worker_momentum: each peer sends its momentum buffer; attacks see the buffers; checkpoints keep them."""

from __future__ import annotations

import pytest
import torch

import byztrain
from byztrain import Config
from byztrain.config import ConfigError
from byztrain.runtime import checkpoint as ckpt
from byztrain.runtime.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

BETA = 0.9


def _config(tmp_path=None, **over) -> Config:
    data = {
        "peers": 6,
        "byzantine": 1,
        "attack": {"name": "none"},
        "defense": {"name": "median"},
        "train": {"steps": 12, "batch_size": 16, "momentum": 0.0, "worker_momentum": BETA},
        "log": {"tensorboard": False, "every": 1},
    }
    if tmp_path is not None:
        data["log"]["out"] = str(tmp_path)
    for key, value in over.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return Config.from_dict(data)


def _two_rounds(cfg: Config) -> tuple[Trainer, list[dict[int, torch.Tensor]], list[torch.Tensor]]:
    """Each peer's true gradient and every sent row at steps 1 and 2 from the same parameters."""
    tr = Trainer(cfg, progress=False)
    peers = list(range(cfg.peers))
    grads, rows = [], []
    for step in (1, 2):
        rnd = tr.make_round(step)
        grads.append({p: rnd.honest_gradient(p).clone() for p in peers})
        rows.append(rnd.sent_gradients(peers))
    return tr, grads, rows


def test_each_peer_sends_beta_times_its_buffer_plus_its_gradient(synthetic):
    cfg = _config(attack={"name": "sign_flip", "start": 0, "params": {"scale": -2.0}})
    tr, grads, rows = _two_rounds(cfg)
    (byz,) = tr.byzantine
    for p in range(cfg.peers):
        m = BETA * grads[0][p] + grads[1][p]
        assert not torch.allclose(m, grads[1][p])
        # the attacker's hook gets its buffer as g: it flips what it would have sent
        want = -2.0 * m if p == byz else m
        torch.testing.assert_close(rows[1][p], want, rtol=1e-6, atol=1e-7)
        assert torch.equal(rows[0][p], -2.0 * grads[0][p] if p == byz else grads[0][p])


def test_the_omniscient_attack_sees_the_honest_buffers(synthetic):
    cfg = _config(attack={"name": "alie", "start": 0})
    tr = Trainer(cfg, progress=False)
    (byz,) = tr.byzantine
    seen = []
    attack = tr.attacks[byz]
    original = attack.omniscient
    attack.omniscient = lambda honest, ctx: (seen.append(honest.clone()), original(honest, ctx))[1]
    honest = [p for p in range(cfg.peers) if p != byz]
    grads = []
    for step in (1, 2):
        rnd = tr.make_round(step)
        grads.append({p: rnd.honest_gradient(p).clone() for p in honest})
        rnd.sent_gradients(list(range(cfg.peers)))
    want = torch.stack([BETA * grads[0][p] + grads[1][p] for p in honest])
    torch.testing.assert_close(seen[1], want, rtol=1e-6, atol=1e-7)


def test_with_the_mean_it_is_the_servers_momentum_moved_to_the_peers(synthetic):
    """Averaging is linear: mean_i(beta m_i + g_i) = beta mean_i(m_i) + mean_i(g_i), so the same parameters up
    to float rounding; another beta is far off (the comparison can fail)."""

    def params(momentum: float, worker: float) -> torch.Tensor:
        cfg = _config(byzantine=0, defense={"name": "mean"}, train={"momentum": momentum, "worker_momentum": worker})
        tr = Trainer(cfg, progress=False)
        for _ in range(cfg.train.steps):
            tr.train_step()
        return tr.workload.flat_params.clone()

    server, workers, other = params(BETA, 0.0), params(0.0, BETA), params(0.0, 0.5)
    start = Trainer(_config(byzantine=0, defense={"name": "mean"}), progress=False).workload.flat_params
    moved = (server - start).norm()
    assert (workers - server).norm() < 1e-4 * moved
    assert (other - server).norm() > 0.1 * moved


def test_a_resumed_run_keeps_the_buffers_bit_for_bit(synthetic, tmp_path, run_killed):
    over = {"attack": {"name": "sign_flip", "start": 0}, "runtime": {"checkpoint_every": 5}}
    full = _config(tmp_path / "full", **over)
    byztrain.run(full, quiet=True)
    cut = full.with_overrides([f"log.out={tmp_path / 'cut'}"])
    run_killed(cut, 8)  # a kill after the checkpoint of step 5
    own = ckpt.read(ckpt.latest(tmp_path / "cut"))[1]
    assert sorted(own) == list(range(full.peers))  # every peer's buffer, the attacker's with its attack
    assert set(ckpt.from_bytes(own[0])) == {"momentum"}
    byztrain.run(cut, quiet=True, resume=True)
    a = ckpt.from_bytes(ckpt.read(ckpt.latest(tmp_path / "full"))[0])
    b = ckpt.from_bytes(ckpt.read(ckpt.latest(tmp_path / "cut"))[0])
    assert a["step"] == b["step"] == 12
    assert torch.equal(a["params"], b["params"])


def test_config_accepts_it_for_trusted_server_defenses_only():
    with pytest.raises(ConfigError, match="train.worker_momentum.*btard"):
        _config(defense={"name": "btard"})
    with pytest.raises(ConfigError, match=r"train.worker_momentum.*\[0, 1\)"):
        _config(train={"worker_momentum": 1.0})
    _config(defense={"name": "mean"})
    _config(defense={"name": "cclip_ps"})


def test_off_it_leaves_the_config_hash_of_finished_runs_unchanged():
    # Hashes from before the key existed: a sweep recognises its finished runs by them.
    assert Config().config_hash() == "3d244a50fc4c5426"
    cfg = Config.from_dict({"peers": 8, "byzantine": 3, "defense": {"name": "median"}, "attack": {"name": "alie"}})
    assert cfg.config_hash() == "3ab8a7e6ff8bef6d"
    assert cfg.with_overrides(["train.worker_momentum=0.5"]).config_hash() != cfg.config_hash()
