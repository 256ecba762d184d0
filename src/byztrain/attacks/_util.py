"""Helpers shared by the attack modules: deterministic randomness and parameter checks.

Every random draw of an attack is a pure function of (run seed, step, peer, purpose).

Attacks never touch the global RNG. A generator seeded from a hash of its coordinates makes a run replayable
and lets colluding attackers agree on a draw without talking (pass the same `peer`, e.g. -1, to all of them).
"""

from __future__ import annotations

import hashlib
import struct

import torch


def derive_seed(run_seed: int, *coords: int | str) -> int:
    """A 63-bit seed from the run seed and any mix of integer / string coordinates (sha256, order-sensitive)."""
    h = hashlib.sha256(b"byztrain.attacks")
    h.update(struct.pack("<q", int(run_seed)))
    for c in coords:
        if isinstance(c, str):
            b = c.encode()
            h.update(b"s" + struct.pack("<I", len(b)) + b)
        else:
            h.update(b"i" + struct.pack("<q", int(c)))
    return int.from_bytes(h.digest()[:8], "little") >> 1


def generator(run_seed: int, *coords: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded by `derive_seed(run_seed, *coords)`."""
    return torch.Generator().manual_seed(derive_seed(run_seed, *coords))


def unit_direction(dim: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A uniformly random unit vector of length `dim` (normalised standard normal), on `like`'s device/dtype.

    Drawn on the CPU so the direction does not depend on the device the run uses.
    """
    u = torch.randn(dim, generator=gen, dtype=torch.float32)
    u /= u.norm().clamp_min(torch.finfo(torch.float32).tiny)
    return u.to(device=like.device, dtype=like.dtype)
