"""Checkpoints in the run folder, shared by both runtimes, and what `--resume` does with them.

Layout (one checkpoint kept; the pointer is replaced atomically after its files exist):

    <run>/checkpoints/latest.json          {"step", "dir", "peers", "config_hash", "runtime", "numerics"}
    <run>/checkpoints/step-0000200/common.pt       the state every honest peer holds identically
    <run>/checkpoints/step-0000200/peer-<peer>.pt    a peer's own state: its attack's, its worker momentum

`common.pt`: step, flat parameters, optimizer state (momentum), active set and bans, shared randomness
r_t, the previous step's record (validators), the defense's state (BTARD's step record, a baseline's
bucketing generator...), accuracies, the partially filled logging window and elapsed time. Every honest
process of the distributed runtime holds the same values, so only the writer (rank 0) saves them, and the
other processes ship their own peer's state (attack, worker-momentum buffer) to it: only rank 0 touches the
disk, which is what makes multi-host runs work without a shared file system. The format is the same for both runtimes: a simulated
checkpoint resumes distributed and vice versa.

Nothing else needs saving: minibatches, validator draws and attack randomness are functions of public
seeds (run seed, step, peer, r_{t-1}), models have no dropout/BatchNorm, and no code draws from the global
RNG, so a resumed run continues bit for bit (tests/test_distributed.py checks it).

What else decides a gradient's bits is fixed for a run and recorded in latest.json as "numerics"
(`numerics`): torch's intra-op thread count (reductions split differently with more threads), the device
type (and GPU model / CPU vector capability), the torch version and the default dtype. A resume that would
change any of them is refused with a ConfigError naming it (`check_numerics`): validators compare
recomputed gradients bitwise, so the first validator of the resumed run would ban an honest peer. The
thread count compared is the effective one, `runtime.threads`, or else 1 per process in the distributed
runtime and torch's current count in the simulator; so a simulated checkpoint resumes distributed (and vice
versa) exactly when both count the same threads (e.g. runtime.threads=1 in both). runtime.* keys may differ
(RESUMABLE_CHANGES) as long as these effective values do not.

On resume, lines of metrics.jsonl and events.jsonl after the checkpoint step are dropped (the steps are
recomputed, so nothing is duplicated), and a `resume` event is appended.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from byztrain.config import Config, ConfigError
from byztrain.runtime.outputs import write_json_atomic

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
DEFAULT_DISTRIBUTED_EVERY = 50

#: config keys that may differ between a run and its resumption (they do not change the results)
RESUMABLE_CHANGES = ("runtime", "log")


def effective_threads(config: Config) -> int:
    """Intra-op threads the gradients are computed with (see the module docstring)."""
    if config.runtime.threads:
        return int(config.runtime.threads)
    return 1 if config.runtime.kind == "distributed" else torch.get_num_threads()


def numerics(config: Config) -> dict:
    """What decides a gradient's bits besides the config (recorded with every checkpoint)."""
    device = torch.device(config.runtime.device)
    out = {
        "threads": effective_threads(config),
        "device": device.type,
        "torch": torch.__version__,
        "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
    }
    if device.type == "cpu":
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    elif device.type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def check_numerics(config: Config, info: dict) -> None:
    """Refuse to resume the checkpoint `info` (latest.json) with other numerics than it was computed with.
    Checkpoints written before numerics were recorded are not checked."""
    saved = info.get("numerics")
    if not isinstance(saved, dict):
        return
    now = numerics(config)
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if not changed:
        return
    label = {"threads": "torch intra-op threads", "torch": "torch version", "dtype": "default dtype",
             "cpu_capability": "CPU kernels"}
    what = ", ".join(f"{label.get(k, k)} {saved[k]} -> {now[k]}" for k in changed)
    fix = {
        "threads": f"runtime.threads={saved.get('threads')}",
        "device": f"runtime.device={saved.get('device')}",
        "torch": f"torch {saved.get('torch')}",
        "dtype": f"torch.set_default_dtype(torch.{saved.get('dtype')})",
        "cpu_capability": f"a CPU with {saved.get('cpu_capability')} kernels (or ATEN_CPU_CAPABILITY="
        f"{str(saved.get('cpu_capability')).lower()} if this CPU supports them)",
        "gpu": f"a {saved.get('gpu')} GPU",
    }
    field = {"threads": "runtime.threads", "device": "runtime.device"}.get(changed[0], "<resume>")
    raise ConfigError(
        field,
        f"the run's gradients were computed with other numerics than this resume would use ({what}): gradients "
        f"differ in their last bits, so validators would ban honest peers and the run would not continue bit for "
        f"bit; resume with {' and '.join(fix[k] for k in changed)}, or start a new run folder",
    )


def checkpoint_every(config: Config) -> int:
    """Steps between checkpoints: `runtime.checkpoint_every`, or by default 0 (off) in the simulator and
    DEFAULT_DISTRIBUTED_EVERY in the distributed runtime."""
    n = config.runtime.checkpoint_every
    if n is None:
        return DEFAULT_DISTRIBUTED_EVERY if config.runtime.kind == "distributed" else 0
    return int(n)


# ---- object state ----------------------------------------------------------------------------------


def object_state(obj: Any, skip: tuple[str, ...] = ("config",)) -> dict:
    """The picklable attributes of `obj` (callables built from the config, hash objects... are skipped:
    they are rebuilt by the constructor). Attributes are pickled together later, so objects shared between
    attributes (a generator held by a pre-aggregator and by the defense) stay shared."""
    state = {}
    for key, value in vars(obj).items():
        if key in skip:
            continue
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - not state we can (or need to) carry
            continue
        state[key] = value
    return state


def restore_object_state(obj: Any, state: dict) -> None:
    vars(obj).update(state)


def to_bytes(obj: Any) -> bytes:
    f = io.BytesIO()
    torch.save(obj, f)
    return f.getvalue()


def from_bytes(blob: bytes) -> Any:
    # Checkpoints are written by this run's own writer (or by the Byzantine process reading back its own
    # state): trusted, and they hold dataclasses, so full unpickling is needed.
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


# ---- files -----------------------------------------------------------------------------------------


def root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def resume_key(config: Config) -> str:
    """Hash of what a checkpoint must agree on with the config resuming it (all but runtime.* and log.*)."""
    import hashlib

    data = config.to_dict()
    for key in RESUMABLE_CHANGES:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clear(run_dir: Path) -> None:
    """A fresh run in a folder: drop checkpoints of an earlier run there (they would resume the wrong run)."""
    shutil.rmtree(root(run_dir), ignore_errors=True)


def write(run_dir: Path, config: Config, step: int, common: bytes, own: dict[int, bytes]) -> Path:
    """Write a checkpoint, then point latest.json at it, then drop older ones."""
    base = root(run_dir)
    name = f"step-{step:07d}"
    target = base / name
    tmp = base / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "common.pt").write_bytes(common)
    for peer, blob in sorted(own.items()):
        (tmp / f"peer-{peer}.pt").write_bytes(blob)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    write_json_atomic(
        base / LATEST,
        {
            "step": step,
            "dir": name,
            "peers": config.peers,
            "config_hash": config.config_hash(),
            "resume_key": resume_key(config),
            "runtime": config.runtime.kind,
            "numerics": numerics(config),
        },
    )
    for old in base.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest(run_dir: Path) -> dict | None:
    """latest.json of the run folder (with "path" added), or None when there is no usable checkpoint."""
    pointer = root(run_dir) / LATEST
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    path = root(run_dir) / info["dir"]
    if not (path / "common.pt").exists():
        return None
    info["path"] = path
    return info


def read(info: dict) -> tuple[bytes, dict[int, bytes]]:
    path = Path(info["path"])
    own = {}
    for f in [*path.glob("attack-*.pt"), *path.glob("peer-*.pt")]:  # attack-: written before worker momentum
        own[int(f.stem.split("-", 1)[1])] = f.read_bytes()
    return (path / "common.pt").read_bytes(), own


def check_resumable(config: Config, run_dir: Path) -> None:
    """The config must be the run's own, up to keys that do not change results (runtime.*, log.*)."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.exists():
        return
    saved = Config.load(saved_path)
    a, b = saved.to_dict(), config.to_dict()
    for key in RESUMABLE_CHANGES:
        a.pop(key, None)
        b.pop(key, None)
    if a != b:
        diff = sorted(_diff(a, b))
        raise ConfigError(
            "<resume>",
            f"the config differs from the run folder's config.yaml in {', '.join(diff[:6])}; resume with the "
            f"same config (only runtime.* and log.* may change), or start a new run folder",
        )


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def truncate_logs(run_dir: Path, step: int) -> None:
    """Keep the metrics/events lines of steps <= `step` (and drop a torn last line)."""
    for name in ("metrics.jsonl", "events.jsonl"):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(path)


def resume_plan(config: Config, run_dir: Path) -> tuple[dict | None, dict | None]:
    """What `--resume` would do, without touching the folder: (checkpoint info or None, the finished run's
    summary or None). Raises ConfigError when the config or the numerics do not allow resuming."""
    run_dir = Path(run_dir)
    check_resumable(config, run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = None
        if isinstance(summary, dict) and summary.get("config_hash") == config.config_hash():
            return None, summary
    info = latest(run_dir)
    if info is not None and info.get("resume_key") != resume_key(config):
        info = None  # a checkpoint of another run: start over
    if info is not None:
        check_numerics(config, info)
    return info, None


def prepare_resume(config: Config, run_dir: Path) -> tuple[dict | None, dict | None]:
    """For `--resume`: (checkpoint info or None, the finished run's summary or None).

    A run folder whose summary.json exists (same config hash) is finished: nothing to do. Otherwise the
    logs are cut back to the checkpoint step; with no checkpoint the run starts over (fresh logs).
    """
    info, finished = resume_plan(config, run_dir)
    if finished is not None:
        return None, finished
    if info is not None:
        truncate_logs(Path(run_dir), int(info["step"]))
    else:
        clear(Path(run_dir))
    return info, None


def resume_event(info: dict, runtime: str) -> dict:
    return {
        "step": int(info["step"]),
        "type": "resume",
        "peer": None,
        "by": None,
        "reason": f"resumed from the checkpoint of step {info['step']} ({info.get('runtime', '?')} -> {runtime})",
    }
