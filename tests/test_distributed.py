"""Distributed runtime: message codec, checkpoint/resume, simulated-vs-distributed parity, fault behaviour.

Process launches are slow on a shared 2-core machine (each process imports torch), so there are few of
them in this file: the parity runs, the two halves of the fault test and two short runs for the MPRNG keys. Data: a small synthetic task in
the canonical IDX format (1200 training images), written to a temporary folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time

import numpy as np
import pytest
import torch

import byztrain
from byztrain import Config
from byztrain.comm.torch_dist import MessageError, decode, encode
from byztrain.protocol.mprng import peer_key, secret_from_key
from byztrain.runtime import checkpoint as ckpt
from byztrain.runtime.distributed import FAULT_ENV, DistributedRunError
from byztrain.runtime.keyfile import key_path, read_key
from byztrain.runtime.majority import HonestMajorityLost
from byztrain.runtime.outputs import WALL_CLOCK_FIELDS
from byztrain.runtime.round import Round
from byztrain.runtime.trainer import choose_byzantine


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 10-class 28x28 task with labels from a random linear teacher, as gzipped IDX files."""
    out = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(28 * 28, 10))
    for split, n in (("train", 1200), ("t10k", 200)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = ((x.reshape(n, -1) / 255.0 - 0.5) @ teacher).argmax(1).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
            (out / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + arr.tobytes(), compresslevel=1))
    return out


def _config(data_dir, out, *, kind="simulated", peers=4, steps=30, **over) -> Config:
    data = {
        "name": "dist",
        "seed": 3,
        "peers": peers,
        "byzantine": 1,
        "attack": {"name": "sign_flip"},
        "defense": {"name": "mean"},
        "task": {"data_dir": str(data_dir)},
        "train": {"steps": steps, "eval_every": steps, "batch_size": 16},
        # threads=1 in both runtimes: see test_parity for why bitwise equality needs it
        "runtime": {"kind": kind, "timeout_s": 60, "threads": 1, "checkpoint_every": 10},
        "log": {"out": str(out), "every": 5, "tensorboard": False},
    }
    for key, value in over.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return Config.from_dict(data)


def _final_state(run_dir) -> dict:
    info = ckpt.latest(run_dir)
    assert info is not None, f"no checkpoint in {run_dir}"
    return ckpt.from_bytes(ckpt.read(info)[0])


def _rows(run_dir, name="metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def _comparable(rows: list[dict]) -> list[dict]:
    """Fields both runtimes must agree on (bytes differ: the wire format adds headers; cclip statistics are
    per aggregator process; times differ)."""
    keep = ("step", "train_loss", "test_accuracy", "test_loss", "active_peers", "banned", "update_norm")
    return [{k: r[k] for k in keep if k in r} for r in rows]


# ---- no processes ----------------------------------------------------------------------------------


def test_codec_round_trips_protocol_messages_and_refuses_code():
    msg = {
        3: [(1, "missing", None), (2, "bad part", torch.arange(5, dtype=torch.float32))],
        "s": (torch.randn(4, 3, dtype=torch.float64), torch.zeros(0)),
        "c": [b"\x01" * 32, bytearray(b"xy")],
        "t": torch.tensor(7),
        "set": {1, 2},
        "f": float("nan"),
    }
    out = decode(encode(msg))
    assert torch.equal(out[3][1][2], msg[3][1][2]) and out[3][0] == (1, "missing", None)
    assert torch.equal(out["s"][0], msg["s"][0]) and out["s"][1].shape == (0,)
    assert out["c"] == [b"\x01" * 32, b"xy"] and out["t"].item() == 7 and out["set"] == {1, 2}
    # a non-contiguous view is sent as its values
    v = torch.arange(12.0).reshape(3, 4)[:, 1]
    assert torch.equal(decode(encode(v)), v)
    # a Byzantine sender cannot make a receiver run code: no globals are resolved
    skeleton = pickle.dumps(os.system)  # refers to a global
    evil = struct.pack("<q", len(skeleton)) + skeleton
    evil += b"\0" * (-len(evil) % 8)
    with pytest.raises(MessageError):
        decode(torch.frombuffer(bytearray(evil), dtype=torch.uint8))
    with pytest.raises(MessageError):
        encode({"x": object()})
    with pytest.raises(MessageError):
        decode(torch.frombuffer(bytearray(b"\xff" * 16), dtype=torch.uint8))


def test_config_checkpoint_every_validated_and_out_of_the_hash():
    a = Config.from_dict({"runtime": {"checkpoint_every": 5}})
    assert a.config_hash() == Config.from_dict({}).config_hash()
    with pytest.raises(ValueError, match="checkpoint_every"):
        Config.from_dict({"runtime": {"checkpoint_every": -1}})
    assert ckpt.checkpoint_every(Config.from_dict({})) == 0
    assert ckpt.checkpoint_every(Config.from_dict({"runtime": {"kind": "distributed"}})) > 0


def test_simulated_kill_and_resume_is_bitwise_and_keeps_metrics(data_dir, tmp_path, run_killed):
    """A run killed at step 13 (checkpoints every 5) resumes from step 10 to the same final parameters as an
    uninterrupted run; metrics lines up to the checkpoint stay as they were, none is duplicated."""
    over = {"runtime": {"checkpoint_every": 5}, "log": {"every": 1, "tensorboard": False}}
    full = _config(data_dir, tmp_path / "full", steps=16, defense={"name": "trimmed_mean"}, **over)
    byztrain.run(full, quiet=True)

    cut = full.with_overrides([f"log.out={tmp_path / 'cut'}"])
    run_killed(cut, 12)
    before = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(before[-1])["step"] == 12
    summary = byztrain.run(cut, quiet=True, resume=True)
    assert summary["steps"] == 16
    after = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert after[:11] == before[:11]  # steps 0..10 untouched
    assert [json.loads(x)["step"] for x in after] == list(range(17))
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "cut")
    assert torch.equal(a["params"], b["params"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "full")) == strip(_rows(tmp_path / "cut"))
    assert [e["type"] for e in _rows(tmp_path / "cut", "events.jsonl")] == ["resume"]
    # a finished run resumes to its summary without running again
    assert byztrain.run(cut, quiet=True, resume=True)["config_hash"] == summary["config_hash"]
    # resuming with a different training config is refused, naming the field
    with pytest.raises(ValueError, match="train.lr"):
        byztrain.run(cut.with_overrides(["train.lr=0.1"]), quiet=True, resume=True)


def test_resume_with_other_numerics_is_refused_naming_the_fix(data_dir, tmp_path, run_killed):
    """The default CNN's gradients differ in their last bits between 1 and 2 torch threads: a BTARD run
    computed at 1 thread and resumed at 2 had its first validator ban an honest peer (step 11 here). Such a
    resume is refused in both runtimes, naming the setting, and leaves the folder as it was; with the same
    numerics the run continues bit for bit."""
    over = {"runtime": {"checkpoint_every": 5}, "log": {"every": 1, "tensorboard": False}}
    honest = {"byzantine": 0, "attack": {"name": "none"}, "defense": {"name": "btard"}}
    full = _config(data_dir, tmp_path / "full", steps=14, **honest, **over)
    byztrain.run(full, quiet=True)
    cut = full.with_overrides([f"log.out={tmp_path / 'cut'}"])
    (tmp_path / "cut").mkdir()
    shutil.copy(key_path(tmp_path / "full"), key_path(tmp_path / "cut"))  # the same MPRNG key: same run
    run_killed(cut, 12)
    before = (tmp_path / "cut" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"'runtime.threads'.*threads 1 -> 2.*resume with runtime.threads=1"):
        byztrain.run(cut.with_overrides(["runtime.threads=2"]), quiet=True, resume=True)
    # the distributed runtime refuses it too, before starting any process
    with pytest.raises(ValueError, match="resume with runtime.threads=1"):
        byztrain.run(cut.with_overrides(["runtime.kind=distributed", "runtime.threads=2"]), quiet=True, resume=True)
    pointer = tmp_path / "cut" / "checkpoints" / "latest.json"
    saved = json.loads(pointer.read_text())
    pointer.write_text(json.dumps({**saved, "numerics": {**saved["numerics"], "torch": "0.0"}}))
    with pytest.raises(ValueError, match=f"torch version 0.0 -> {re.escape(torch.__version__)}.*resume with torch 0.0"):
        byztrain.run(cut, quiet=True, resume=True)
    pointer.write_text(json.dumps(saved))
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == before
    assert torch.get_num_threads() == 1  # a refused resume leaves the caller's thread count alone
    summary = byztrain.run(cut, quiet=True, resume=True)
    assert summary["steps"] == 14 and summary["banned"] == {}
    assert torch.equal(_final_state(tmp_path / "full")["params"], _final_state(tmp_path / "cut")["params"])


def test_numerics_compare_effective_threads_across_runtimes(monkeypatch):
    """A simulated checkpoint resumes distributed (one thread per process unless runtime.threads says more)
    exactly when both count the same threads."""
    sim = Config.from_dict({"runtime": {"kind": "simulated"}})
    dist_ = Config.from_dict({"runtime": {"kind": "distributed"}})
    assert ckpt.numerics(sim)["threads"] == 1  # the autouse fixture's count
    ckpt.check_numerics(dist_, {"numerics": ckpt.numerics(sim)})
    torch.set_num_threads(2)
    at_two = {"numerics": ckpt.numerics(sim)}
    assert at_two["numerics"]["threads"] == 2
    with pytest.raises(ValueError, match="resume with runtime.threads=2"):
        ckpt.check_numerics(dist_, at_two)
    ckpt.check_numerics(dist_.with_overrides(["runtime.threads=2"]), at_two)
    ckpt.check_numerics(dist_, {"step": 5})  # a checkpoint without numerics (older) is not checked
    with pytest.raises(ValueError, match="'runtime.device'.*device cuda -> cpu"):
        ckpt.check_numerics(sim, {"numerics": {**at_two["numerics"], "device": "cuda"}})


# ---- processes -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "defense, attack, train",
    [
        ("mean", {"name": "sign_flip", "params": {"scale": -1.0}}, {}),
        ("btard", {"name": "sign_flip", "start": 3}, {}),
        # omniscient: in the distributed runtime the honest processes hand their gradients to the attacker's
        ("btard", {"name": "alie", "start": 3, "params": {"z": 1.0}}, {}),
        # each process keeps its own peer's momentum buffer; the attacker is handed the honest buffers
        ("median", {"name": "alie", "start": 3, "params": {"z": 1.0}}, {"momentum": 0.0, "worker_momentum": 0.9}),
    ],
)
def test_parity_simulated_vs_distributed(data_dir, tmp_path, defense, attack, train):
    """Same config and seed, 4 peers, one attacker, 30 steps: the simulator and 4 processes end with the
    same parameters, bit for bit, and the same bans.

    Why bitwise holds: a gradient is the same sequence of kernels on the same bytes in both runtimes (the
    minibatch is a function of a public seed, the model has no dropout/BatchNorm), on one intra-op thread
    each (with several threads, CPU reductions may split differently, so threads=1 is part of the
    contract); messages carry the exact float32 bytes; every aggregation sees its inputs in the same peer
    order (the mean over the stacked rows, BTARD's CenteredClip on the same (n, k) partition block); so
    every process applies the very update the simulator applies, step after step; BTARD's shared randomness
    agrees because both run folders hold the same MPRNG key file. No tolerance needed.
    """
    sim = _config(data_dir, tmp_path / "sim", defense={"name": defense}, attack=attack, train=train)
    dis = _config(data_dir, tmp_path / "dis", kind="distributed", defense={"name": defense}, attack=attack, train=train)
    s_sim = byztrain.run(sim, quiet=True)
    (tmp_path / "dis").mkdir()
    shutil.copy(key_path(tmp_path / "sim"), key_path(tmp_path / "dis"))
    s_dis = byztrain.run(dis, quiet=True)
    a, b = _final_state(tmp_path / "sim"), _final_state(tmp_path / "dis")
    assert a["step"] == b["step"] == 30
    assert torch.equal(a["params"], b["params"])
    assert s_sim["banned"] == s_dis["banned"] and a["active"] == b["active"]
    if defense == "btard":
        assert s_dis["banned"], "the sign flipper should be caught within 30 steps"
    assert _comparable(_rows(tmp_path / "sim")) == _comparable(_rows(tmp_path / "dis"))
    bans = lambda d: [(e["step"], e["peer"], e["reason"]) for e in _rows(d, "events.jsonl") if e["type"] == "ban"]  # noqa: E731
    assert bans(tmp_path / "sim") == bans(tmp_path / "dis")
    rows = _rows(tmp_path / "dis")
    assert all(r["bytes_sent_mean"] > 0 and len(r["bytes_sent_per_peer"]) == 4 for r in rows[1:])


@pytest.mark.slow
def test_fault_kill_honest_and_byzantine_then_writer_and_resume(data_dir, tmp_path, monkeypatch):
    """kill -9 of an honest and the Byzantine process mid-run: both are banned as silent and the run goes
    on. Then rank 0 (the writer) is killed after step 23: the run stops with DistributedRunError naming the
    checkpoint (step 20); `--resume` finishes it. Metrics written before each kill stay intact and no step
    is logged twice; the resumed run matches the simulator bit for bit up to the crash-induced bans (the
    simulator cannot lose processes, so the comparison starts from the checkpoint: the simulator resumes a
    copy of the stopped run folder)."""
    out = tmp_path / "run"
    cfg = _config(
        data_dir,
        out,
        kind="distributed",
        peers=5,
        steps=30,
        defense={"name": "btard"},
        attack={"name": "sign_flip", "start": 1000},  # a sleeper: it would otherwise be caught before the kill
        log={"every": 1, "tensorboard": False},
    )
    byz = choose_byzantine(cfg)[0]
    honest = next(p for p in range(1, 5) if p != byz)
    out.mkdir()
    key_path(out).write_text(hashlib.sha256(b"fault test").hexdigest() + "\n")  # validators replay
    killed_at = {}

    def killer():
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                rows = [json.loads(x) for x in metrics.read_text().splitlines()]
            except (OSError, ValueError):
                rows = []
            if rows and rows[-1]["step"] >= 8:
                for p in mp.active_children():
                    if p.name in (f"byztrain-rank{honest}", f"byztrain-rank{byz}"):
                        os.kill(p.pid, signal.SIGKILL)
                killed_at["step"] = rows[-1]["step"]
                killed_at["lines"] = metrics.read_text().splitlines()
                return
            time.sleep(0.02)

    monkeypatch.setenv(FAULT_ENV, "0@23")  # rank 0 SIGKILLs itself right after step 23
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(DistributedRunError, match="step 20"):
        byztrain.run(cfg, quiet=True)
    thread.join(5)
    assert killed_at, "the processes were not killed"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(killed_at["lines"])] == killed_at["lines"]  # intact after the first kills
    assert [json.loads(x)["step"] for x in lines] == list(range(24))
    events = _rows(out, "events.jsonl")
    bans = {e["peer"]: e for e in events if e["type"] == "ban"}
    # absent from the first broadcast of the step it missed: a worker's commitments or, for that step's
    # validator (who commits no gradient), its MPRNG commitment
    absent = ("silent", "mprng: no commitment")
    assert set(bans) == {honest, byz}
    assert all(any(a in e["reason"] for a in absent) for e in bans.values()), bans
    assert all(e["step"] <= killed_at["step"] + 2 for e in bans.values())

    replay = tmp_path / "replay"
    shutil.copytree(out, replay)  # the stopped run, to resume in the simulator below
    monkeypatch.delenv(FAULT_ENV)
    summary = byztrain.run(cfg, quiet=True, resume=True)
    assert summary["steps"] == 30 and set(map(int, summary["banned"])) == {honest, byz}
    assert summary["honest_banned"] == 1 and summary["byzantine_banned"] == 1
    resumed = (out / "metrics.jsonl").read_text().splitlines()
    assert resumed[:21] == lines[:21]  # up to the checkpoint: as written before the writer died
    assert [json.loads(x)["step"] for x in resumed] == list(range(31))
    assert [e["type"] for e in _rows(out, "events.jsonl")].count("resume") == 1
    # the distributed resume continued exactly as the simulator does from the same checkpoint
    sim = cfg.with_overrides([f"log.out={replay}", "runtime.kind=simulated"])
    byztrain.run(sim, quiet=True, resume=True)
    assert torch.equal(_final_state(replay)["params"], _final_state(out)["params"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["simulated", "distributed"])
def test_a_huge_aggregate_is_caught_in_its_step_in_both_runtimes(data_dir, tmp_path, kind):
    """A Byzantine aggregator publishes its aggregate moved by 1e8 x its norm at step 10. The check's
    tolerance is bounded by honest quantities (at most n * tau), so the partition goes to a dispute and
    the aggregator is banned in that step; the update applied stays an honest one, nobody else is banned
    and the run finishes."""
    cfg = _config(
        # no validators: the attacker aggregates at step 10 whatever the run's fresh MPRNG key draws
        data_dir, tmp_path / kind, kind=kind, steps=14, defense={"name": "btard", "validators": 0},
        attack={"name": "bad_aggregation", "start": 10, "stop": 11, "params": {"size": 1e8}},
    )
    summary = byztrain.run(cfg, quiet=True)
    (byz,) = choose_byzantine(cfg)
    assert summary["steps"] == 14
    assert summary["banned"] == {str(byz): 10} and summary["honest_banned"] == 0
    norms = [r["update_norm"] for r in _rows(tmp_path / kind) if "update_norm" in r]
    assert max(norms) < 100 * min(norms)


def test_distributed_run_stops_when_crashes_leave_no_honest_majority(data_dir, tmp_path, monkeypatch):
    """4 processes, 1 Byzantine (a sleeper), mean: two honest processes are killed (after steps 3 and 5). Each
    is banned as silent, which alone the runtime tolerates; after the second, the Byzantine peer is 1 of 2
    active. Every process stops at that step (no hang), the writer flushes the metrics and keeps a
    checkpoint, and the parent raises HonestMajorityLost with the reason; no summary.json."""
    out = tmp_path / "run"
    cfg = _config(data_dir, out, kind="distributed", attack={"name": "sign_flip", "start": 1000})
    byz = choose_byzantine(cfg)
    h1, h2 = [p for p in range(1, 4) if p not in byz]
    monkeypatch.setenv(FAULT_ENV, f"{h1}@3,{h2}@5")
    with pytest.raises(HonestMajorityLost, match="stopped at step 6: Byzantine share 1 of 2 active peers"):
        byztrain.run(cfg, quiet=True)
    events = _rows(out, "events.jsonl")
    bans = {e["peer"]: e for e in events if e["type"] == "ban"}
    assert set(bans) == {h1, h2} and all(e["reason"].startswith("silent") for e in bans.values())
    (stop,) = [e for e in events if e["type"] == "majority_lost"]
    assert stop["step"] == 6 and stop["honest_silent"] == [h1, h2] and stop["byzantine_active"] == 1
    assert [r["step"] for r in _rows(out)] == [0, 5, 6]
    assert _final_state(out)["step"] == 6 and not (out / "summary.json").exists()


# ---- MPRNG keys in the distributed runtime ---------------------------------------------------------------


def _key_run(data_dir, out, kind="simulated") -> Config:
    """4 peers, BTARD, 8 steps: the shared randomness seeds the minibatches, so a key shows in the params."""
    return _config(data_dir, out, kind=kind, steps=8, defense={"name": "btard"}, attack={"name": "sign_flip", "start": 3})


@pytest.mark.slow
def test_local_launch_ranks_key_their_secrets_with_the_run_folder_key(data_dir, tmp_path):
    """The launcher reuses the folder's key file and every rank keys its secrets with it: the run matches
    the simulator given the same file, bit for bit, and not the simulator given another key."""
    key = hashlib.sha256(b"the run folder's key").digest()
    for name, k in (("sim", key), ("dis", key), ("other", hashlib.sha256(b"another key").digest())):
        (tmp_path / name).mkdir()
        key_path(tmp_path / name).write_text(k.hex() + "\n")
    byztrain.run(_key_run(data_dir, tmp_path / "sim"), quiet=True)
    byztrain.run(_key_run(data_dir, tmp_path / "dis", kind="distributed"), quiet=True)
    byztrain.run(_key_run(data_dir, tmp_path / "other"), quiet=True)
    assert read_key(tmp_path / "dis") == key
    sim, dis, other = (_final_state(tmp_path / n) for n in ("sim", "dis", "other"))
    assert sim["step"] == dis["step"] == 8
    assert torch.equal(sim["params"], dis["params"]) and sim["shared_random"] == dis["shared_random"]
    assert not torch.equal(sim["params"], other["params"]) and sim["shared_random"] != other["shared_random"]


def _rank_urandom(rank: int) -> bytes:
    """What os.urandom(32) returns in rank `rank`'s process in the torchrun test (recognisable per rank)."""
    return hashlib.sha256(b"urandom of rank %d" % rank).digest()


def _torchrun_rank(rank: int, world: int, port: int, config: Config) -> None:
    """A rank started as torchrun starts it (env://); os.urandom(32) is replaced by `_rank_urandom`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    real = os.urandom
    os.urandom = lambda n: _rank_urandom(rank) if n == 32 else real(n)
    code = 0
    try:
        byztrain.run(config, quiet=True)
    except BaseException:  # noqa: BLE001 - report and exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.mark.slow
def test_torchrun_ranks_without_a_key_file_draw_their_own_keys_from_urandom(data_dir, tmp_path, monkeypatch):
    """Under torchrun with no key file, rank r keys its secrets with its own os.urandom draw: the run equals
    a simulation whose peer r uses the key derived from rank r's draw, and no key file appears."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _key_run(data_dir, tmp_path / "torchrun", kind="distributed")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_torchrun_rank, args=(r, 4, port, cfg), name=f"torchrun-rank{r}") for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    for p in procs:
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert read_key(tmp_path / "torchrun") is None

    def urandom_keyed(self, peer, round_, attempt):
        return secret_from_key(peer_key(_rank_urandom(peer), peer), self.step, round_, attempt)

    monkeypatch.setattr(Round, "mprng_secret", urandom_keyed)
    byztrain.run(_key_run(data_dir, tmp_path / "sim"), quiet=True)
    a, b = _final_state(tmp_path / "torchrun"), _final_state(tmp_path / "sim")
    assert a["step"] == b["step"] == 8
    assert torch.equal(a["params"], b["params"]) and a["shared_random"] == b["shared_random"]
