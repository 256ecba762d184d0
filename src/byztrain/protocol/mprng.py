"""MPRNG: shared randomness by commit-reveal among the active peers.

Round: every participant p draws a 32-byte secret x_p and broadcasts c_p = sha256(TAG || step || p || x_p)
(the commitment is bound to the step and the sender: a Byzantine peer that copies an honest
peer's commitment cannot open it, because its own opening hashes with its own id); barrier; every
participant reveals x_p; everyone checks sha256(TAG || step || p || x_p) == c_p. The output is
r = XOR of all reveals, uniform as long as one participant is honest: every commitment is fixed before
any reveal, so no one can choose its x_p as a function of the others'.

A missing commitment, a malformed one, a missing reveal or one that does not open the commitment bans the
peer (all of these are seen identically by every peer on the broadcast channel, so the ban is provable),
and the round is rerun without it, with *fresh* secrets (reusing a revealed secret would let the
attackers steer the rerun). Each rerun costs the attackers a peer, so there are at most b reruns in a run.

Secrets: every peer keys its secrets with a private 32-byte key, x_p = HMAC-SHA256(key_p, TAG ||
step || round || attempt) (`secret_from_key`): fresh for every round and aggregation attempt, and
unpredictable to anyone without key_p, so r_t is unknown until the last honest reveal. In byztrain the
peers' keys come from one per-run master key (`peer_key`: key_p = HMAC-SHA256(master, TAG || p)), kept in
the run folder and never handed to an attack hook, so a run replays exactly from its folder
(docs/protocol.md, "Where honest secrets come from").
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from byztrain.comm import Collective

TAG = b"byztrain/mprng/v1"
SECRET_BYTES = 32
KEY_BYTES = 32
PEER_KEY_TAG = b"byztrain/mprng-peer-key/v1"
SECRET_TAG = b"byztrain/mprng-secret/v2"


def commitment(step: int, peer: int, secret: bytes) -> bytes:
    """sha256(TAG || step || peer || secret): the commitment binds the step and the sender."""
    return hashlib.sha256(TAG + struct.pack("<qq", step, peer) + bytes(secret)).digest()


def peer_key(master: bytes, peer: int) -> bytes:
    """Peer `peer`'s private MPRNG key derived from the run's master key: HMAC-SHA256(master, tag || peer)."""
    return hmac.new(bytes(master), PEER_KEY_TAG + struct.pack("<q", peer), hashlib.sha256).digest()


def secret_from_key(key: bytes, step: int, round_: int, attempt: int) -> bytes:
    """A peer's MPRNG secret for (step, round, aggregation attempt): HMAC-SHA256 under its private key."""
    blob = SECRET_TAG + struct.pack("<qqq", step, round_, attempt)
    return hmac.new(bytes(key), blob, hashlib.sha256).digest()


def xor_bytes(values: list[bytes]) -> bytes:
    acc = 0
    for v in values:
        acc ^= int.from_bytes(v, "little")
    return acc.to_bytes(SECRET_BYTES, "little")


def _is_secret(x: object) -> bool:
    return isinstance(x, (bytes, bytearray)) and len(x) == SECRET_BYTES


@dataclass
class MprngResult:
    value: int  # r as a 64-bit integer (the first 8 bytes of the XOR, little-endian)
    digest: bytes  # the full 32-byte XOR
    participants: tuple[int, ...]  # peers whose reveals went into the XOR
    banned: dict[int, str] = field(default_factory=dict)  # peer -> reason, in ban order
    rounds: int = 1


def run_mprng(
    comm: Collective,
    step: int,
    peers: list[int],
    *,
    secret: Callable[[int, int], bytes],
    reveal: Callable[[int, bytes], bytes | None] | None = None,
    commit_override: Callable[[int, bytes], bytes | None] | None = None,
    on_ban: Callable[[int, str], None] | None = None,
    max_rounds: int | None = None,
) -> MprngResult:
    """Run commit-reveal among `peers` (SPMD over `comm.local_peers`) until a round has no faults.

    `secret(peer, round)` gives a local peer's secret for a round; `reveal(peer, secret)` is what the peer
    reveals (honest: the secret; a Byzantine hook may return None to withhold or other bytes);
    `commit_override(peer, honest_commitment)` lets tests substitute a commitment (e.g. a copied one).
    `on_ban(peer, reason)` is called once per banned peer, in order.
    """
    participants = sorted(peers)
    banned: dict[int, str] = {}
    rounds = 0
    limit = max_rounds if max_rounds is not None else len(participants) + 1
    while True:
        rounds += 1
        if not participants:
            raise RuntimeError(f"MPRNG at step {step}: every participant was banned")
        if rounds > limit:
            raise RuntimeError(f"MPRNG at step {step}: no clean round in {limit} rounds")
        local = [p for p in comm.local_peers if p in participants]
        secrets = {p: bytes(secret(p, rounds - 1)) for p in local}
        commits = {}
        for p in local:
            c = commitment(step, p, secrets[p])
            if commit_override is not None:
                c = commit_override(p, c)
            if c is not None:
                commits[p] = c
        got = comm.all_gather(commits, participants)
        faults: dict[int, str] = {}
        for p in participants:
            c = got.get(p)
            if c is None:
                faults[p] = "mprng: no commitment"
            elif not (isinstance(c, (bytes, bytearray)) and len(c) == 32):
                faults[p] = "mprng: malformed commitment"
        comm.barrier()
        reveals = {}
        for p in local:
            if p in faults:
                continue
            x = secrets[p] if reveal is None else reveal(p, secrets[p])
            if x is not None:
                reveals[p] = x
        opened = comm.all_gather(reveals, [p for p in participants if p not in faults])
        for p in participants:
            if p in faults:
                continue
            x = opened.get(p)
            if x is None:
                faults[p] = "mprng: withheld reveal"
            elif not _is_secret(x):
                faults[p] = "mprng: malformed reveal"
            elif commitment(step, p, x) != bytes(got[p]):
                faults[p] = "mprng: reveal does not open the commitment"
        if not faults:
            xor = xor_bytes([bytes(opened[p]) for p in participants])
            return MprngResult(
                value=int.from_bytes(xor[:8], "little"),
                digest=xor,
                participants=tuple(participants),
                banned=banned,
                rounds=rounds,
            )
        for p in sorted(faults):
            banned[p] = faults[p]
            if on_ban is not None:
                on_ban(p, faults[p])
        participants = [p for p in participants if p not in faults]
