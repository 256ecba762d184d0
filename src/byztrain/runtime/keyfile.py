"""The run's private MPRNG master key, `<run>/mprng.key` (64 hex digits and a newline, mode 0600).

Honest peers key their MPRNG secrets with it (byztrain.protocol.mprng: `peer_key`, `secret_from_key`), so
no attacker can predict the shared randomness; keeping it in the run folder makes the run replay exactly
from that folder. It is created at the first start of a run in a folder and reused by every later start
there (`--resume`, or a rerun), never written to config.yaml, the logs or a checkpoint, and never given to
an attack hook. Copy it along with the folder to reproduce a run elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from byztrain.config import ConfigError
from byztrain.protocol.mprng import KEY_BYTES

KEY_FILE = "mprng.key"


def key_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / KEY_FILE


def read_key(run_dir: Path | str) -> bytes | None:
    """The run folder's master key, or None when the folder has no key file."""
    path = key_path(run_dir)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"<{KEY_FILE}>", f"{path} must hold {2 * KEY_BYTES} hex digits (the run's MPRNG key); remove it to "
            "draw a new key (the run then no longer replays as before)"
        )
    return key


def ensure_key(run_dir: Path | str) -> bytes:
    """The run folder's master key, created from os.urandom if the folder has none yet."""
    key = read_key(run_dir)
    if key is not None:
        return key
    path = key_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(KEY_BYTES).hex() + "\n")
    try:
        os.link(tmp, path)  # atomic, and refuses to replace a key another process created meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return read_key(run_dir)
