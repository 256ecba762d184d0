"""Honest MPRNG secrets are private: an attacker that knows everything public cannot predict r_t.

`validator_dodge` cheats only when it predicts that no honest validator will check it at the next step,
predicting r_t from the secrets' only public derivation. With secrets derived from public data it is
never caught; with each peer's secrets keyed by the run's private key it is banned like any cheater. The
key lives in the run folder (mprng.key): out of the config, the logs, the checkpoints and every attack
hook's reach, and a run replays exactly from its folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle

import pytest
import torch

import byztrain
from byztrain import Config
from byztrain.attacks import AttackContext, build_attack
from byztrain.attacks.protocol import guessed_secret, predicted_shared_random
from byztrain.cli import main
from byztrain.config import ConfigError
from byztrain.protocol.mprng import peer_key
from byztrain.runtime import checkpoint as ckpt
from byztrain.runtime.keyfile import KEY_FILE, ensure_key, key_path, read_key
from byztrain.runtime.outputs import WALL_CLOCK_FIELDS
from byztrain.runtime.round import Round
from byztrain.runtime.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def dodge_config(seed: int, **over) -> Config:
    data = {
        "seed": seed,
        "peers": 8,
        "byzantine": 3,
        "attack": {"name": "validator_dodge"},
        "defense": {"name": "btard"},
        "train": {"steps": 250, "batch_size": 16},
        "log": {"tensorboard": False},
    }
    data.update(over)
    return Config.from_dict(data)


def count_attacks(tr: Trainer) -> list[int]:
    """Make every dodger count the steps it applied its wrapped attack (one counter per trainer)."""
    counter = [0]
    for attack in tr.attacks.values():
        original = attack.base.on_gradient

        def counted(g, ctx, original=original):
            counter[0] += 1
            return original(g, ctx)

        attack.base.on_gradient = counted
    return counter


def public_derivation(monkeypatch):
    """Honest secrets derived from public data (run seed, step, peer, round, attempt), as the attacker
    guesses them: what the simulator did before secrets were keyed."""

    def secret(self, peer, round_, attempt):
        return guessed_secret(self.config.seed, self.step, peer, round_, attempt)

    monkeypatch.setattr(Round, "mprng_secret", secret)


# ---- a) predictable vs private secrets ----------------------------------------------------------------


def test_dodger_is_never_caught_when_honest_secrets_derive_from_public_data(synthetic, monkeypatch):
    """The attack has teeth: it predicts every r_t exactly, attacks on most steps and is never banned."""
    public_derivation(monkeypatch)
    tr = Trainer(dodge_config(seed=0), progress=False)
    attacked = count_attacks(tr)
    for _ in range(120):
        predicted = predicted_shared_random(tr.config.seed, tr.step + 1, tr.active)
        tr.train_step()
        assert tr.shared_random == predicted
    assert tr.banned == {}
    assert attacked[0] > 0.7 * 3 * 120, attacked  # it cheats whenever no honest validator will look


def test_dodger_is_banned_when_honest_secrets_are_keyed_privately(synthetic):
    """Same run with the runtime's keyed secrets: the prediction is noise and validators ban all three."""
    tr = Trainer(dodge_config(seed=0), progress=False, secret_key=hashlib.sha256(b"private").digest())
    attacked = count_attacks(tr)
    hits = 0
    while set(tr.byzantine) - set(tr.banned) and tr.step < 250:
        predicted = predicted_shared_random(tr.config.seed, tr.step + 1, tr.active)
        tr.train_step()
        hits += tr.shared_random == predicted
    assert set(tr.banned) == set(tr.byzantine), tr.banned
    assert hits == 0 and attacked[0] > 0


@pytest.mark.slow
def test_cli_validator_dodge_three_of_eight_banned_within_250_steps_in_ten_of_ten_seeds(
    synthetic, tmp_path, capsys
):
    """Acceptance through the command line: each run draws its own key into its run folder."""
    last_ban = {}
    for seed in range(10):
        out = tmp_path / f"seed{seed}"
        args = ["run", f"seed={seed}", "peers=8", "byzantine=3", "defense.name=btard",
                "attack.name=validator_dodge", "train.steps=250", "train.batch_size=8", "train.eval_every=250",
                "log.every=50", "log.tensorboard=false", "runtime.threads=1", "--out", str(out), "--quiet"]
        assert main(args) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert sorted(map(int, summary["banned"])) == summary["byzantine_peers"], (seed, summary["banned"])
        assert summary["honest_banned"] == 0
        last_ban[seed] = max(summary["banned"].values())
        assert read_key(out) is not None
    assert all(step <= 250 for step in last_ban.values()), last_ban


# ---- b) validator_dodge as a catalogue attack ---------------------------------------------------------


def test_validator_dodge_params_and_delegation():
    base = {"byzantine": 3, "peers": 8, "defense": {"name": "btard"}}
    for bad in ("silent", "validator_dodge", "no_such_attack", 3):
        with pytest.raises(ConfigError) as e:
            Config.from_dict({**base, "attack": {"name": "validator_dodge", "params": {"base": bad}}})
        assert e.value.field == "attack.params.base"
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"byzantine": 3, "peers": 8, "attack": {"name": "validator_dodge"}})
    assert e.value.field == "attack.name"  # needs btard
    cfg = Config.from_dict({**base, "attack": {"name": "validator_dodge", "params": {"base": "alie"}}})
    a = build_attack(cfg, 1)
    assert a.is_omniscient and a.base.name == "alie"
    cfg = Config.from_dict({**base, "attack": {"name": "validator_dodge", "params": {"base": "label_flip"}}})
    a = build_attack(cfg, 1)
    ctx = AttackContext(step=5, peer=1, run_seed=0, byzantine=(1, 2, 3), active=tuple(range(8)),
                        num_classes=10, shared_generator=torch.Generator(), shared_random=12345)
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0, 9])
    g = torch.ones(3)
    attacking = a.unchecked_next_step(ctx)
    assert a.on_batch(x, y, ctx)[1].tolist() == ([9, 0] if attacking else [0, 9])
    assert a.on_gradient(g, ctx) is g  # label_flip has no gradient hook


def test_validator_dodge_attacks_exactly_when_no_honest_validator_targets_it_next():
    from byztrain.protocol.validators import choose_validators

    cfg = Config.from_dict({"byzantine": 3, "peers": 8, "defense": {"name": "btard"},
                            "attack": {"name": "validator_dodge"}})
    a = build_attack(cfg, 4)
    seen = set()
    for step in range(2, 200):
        ctx = AttackContext(step=step, peer=4, run_seed=0, byzantine=(2, 4, 6), active=tuple(range(8)),
                            num_classes=10, shared_generator=torch.Generator(), shared_random=step * 7919)
        before = [p for p in range(8) if p != step % 8]  # step t-1's workers: unknown to the attack
        (v, _), = choose_validators(ctx.shared_random, step, list(range(8)), before, 1)
        workers = [p for p in range(8) if p != v]
        r_t = predicted_shared_random(0, step, range(8))
        nxt = choose_validators(r_t, step + 1, list(range(8)), workers, 1)
        caught = any(t == 4 and w not in (2, 4, 6) for w, t in nxt)
        g = torch.ones(3)
        assert torch.equal(a.on_gradient(g, ctx), g if caught else -1000.0 * g)
        seen.add(caught)
    assert seen == {True, False}


# ---- c) the key: private, out of the run's public outputs, and what makes a run replay ----------------


def _btard_run(tmp_path, name, **over) -> Config:
    data = {
        "seed": 2,
        "peers": 6,
        "byzantine": 2,
        "attack": {"name": "sign_flip", "start": 4},
        "defense": {"name": "btard"},
        "train": {"steps": 12, "eval_every": 12, "batch_size": 8},
        "runtime": {"threads": 1, "checkpoint_every": 5},
        "log": {"out": str(tmp_path / name), "every": 1, "tensorboard": False},
    }
    data.update(over)
    return Config.from_dict(data)


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rows]


def test_key_is_in_no_config_log_checkpoint_or_attack_context(synthetic, tmp_path, monkeypatch):
    contexts = []
    original = Round.context

    def spy(self, peer):
        ctx = original(self, peer)
        contexts.append(ctx)
        return ctx

    monkeypatch.setattr(Round, "context", spy)
    cfg = _btard_run(tmp_path, "a", attack={"name": "validator_dodge", "start": 2})
    byztrain.run(cfg, quiet=True)
    run = tmp_path / "a"
    key = read_key(run)
    secrets = [key, key.hex().encode()] + [peer_key(key, p) for p in range(cfg.peers)]
    secrets += [peer_key(key, p).hex().encode() for p in range(cfg.peers)]
    for f in run.rglob("*"):
        if f.is_file() and f.name != KEY_FILE:
            data = f.read_bytes()
            assert not any(s in data for s in secrets), f
    assert (key_path(run).stat().st_mode & 0o777) == 0o600
    # what a hook receives: public fields only, none of them bytes (a key or a secret)
    assert contexts
    assert [f.name for f in dataclasses.fields(AttackContext)] == [
        "step", "peer", "run_seed", "byzantine", "active", "num_classes", "shared_generator", "shared_random",
        "extra",
    ]
    for ctx in contexts:
        values = [getattr(ctx, f.name) for f in dataclasses.fields(ctx)] + list(ctx.extra.values())
        assert not any(isinstance(v, (bytes, bytearray)) for v in values)
    # nor an attack's own state (checkpointed per Byzantine peer)
    state = pickle.dumps(build_attack(cfg, 1))
    assert not any(s in state for s in secrets)


def test_same_run_folder_replays_a_new_key_does_not_and_resume_is_bitwise(synthetic, tmp_path, run_killed):
    a = _btard_run(tmp_path, "a")
    byztrain.run(a, quiet=True)
    first = _metrics(tmp_path / "a")
    byztrain.run(a, quiet=True)  # a fresh start in the same folder reuses its key
    assert _metrics(tmp_path / "a") == first

    byztrain.run(_btard_run(tmp_path, "b"), quiet=True)  # another folder: another key
    assert read_key(tmp_path / "b") != read_key(tmp_path / "a")
    assert _metrics(tmp_path / "b") != first

    (tmp_path / "c").mkdir()
    key_path(tmp_path / "c").write_bytes(key_path(tmp_path / "a").read_bytes())  # the key copied along
    cut = _btard_run(tmp_path, "c")
    run_killed(cut, 8)  # a kill after the checkpoint of step 5
    byztrain.run(cut, quiet=True, resume=True)
    assert _metrics(tmp_path / "c") == first
    full = ckpt.from_bytes(ckpt.read(ckpt.latest(tmp_path / "a"))[0])
    resumed = ckpt.from_bytes(ckpt.read(ckpt.latest(tmp_path / "c"))[0])
    assert torch.equal(full["params"], resumed["params"])
    assert full["shared_random"] == resumed["shared_random"]


def test_key_file_is_created_once_and_a_damaged_one_is_refused(tmp_path):
    key = ensure_key(tmp_path / "run")
    assert len(key) == 32 and ensure_key(tmp_path / "run") == key == read_key(tmp_path / "run")
    assert ensure_key(tmp_path / "other") != key
    key_path(tmp_path / "run").write_text("not hex\n")
    with pytest.raises(ConfigError, match=KEY_FILE):
        read_key(tmp_path / "run")
    with pytest.raises(ValueError, match="secret_key"):
        Trainer(Config.from_dict({"peers": 4}), progress=False, secret_key=b"short")
