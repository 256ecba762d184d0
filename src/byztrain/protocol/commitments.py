"""Hash commitments over canonical tensor bytes.

A part's commitment is sha256 over its canonical bytes: float32, little-endian, C-contiguous, exactly the
k floats sent (padding included). The commitment is what a receiver checks a scattered part against and
what a validator compares its recomputation with, so it must not depend on memory layout, device or the
host's byte order (pitfall 6): `canonical_bytes` normalises all three.

`DigestCache` memoises digests of unchanged tensors within one step: a tensor is identified by its data
pointer, length, dtype and autograd version counter (bumped by every in-place write to it or to any view
of its storage), and the cache holds a reference so the memory cannot be reused while cached. In the
simulator a receiver's part is the very tensor the sender hashed, so the receiver's check costs a
dictionary lookup; in the distributed runtime received tensors are fresh objects and get hashed.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import torch

DIGEST_BYTES = 32


def canonical_bytes(t: torch.Tensor) -> memoryview:
    """The canonical byte string of a float32 tensor: little-endian float32, C order, on the CPU."""
    if t.dtype != torch.float32:
        raise ValueError(f"commitments cover float32 tensors only, got {t.dtype}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    arr = t.contiguous().numpy()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        arr = arr.astype("<f4")
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def digest(t: torch.Tensor) -> bytes:
    """sha256 of `canonical_bytes(t)` (32 bytes)."""
    return hashlib.sha256(canonical_bytes(t)).digest()


def commit_parts(parts: list[torch.Tensor], cache: DigestCache | None = None) -> list[bytes]:
    """One commitment per part, in partition order."""
    h = cache.digest if cache is not None else digest
    return [h(p) for p in parts]


def is_commitment_list(msg: object, parts: int) -> bool:
    """A well-formed commitment message: a list/tuple of `parts` 32-byte strings."""
    return (
        isinstance(msg, (list, tuple))
        and len(msg) == parts
        and all(isinstance(c, (bytes, bytearray)) and len(c) == DIGEST_BYTES for c in msg)
    )


class DigestCache:
    """Per-step memo of tensor digests (see module docstring). Call `clear()` between steps."""

    def __init__(self):
        self._memo: dict[tuple, tuple[torch.Tensor, bytes]] = {}
        self.hashed_bytes = 0  # bytes actually hashed (not served from the memo), for benchmarks

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.device.type, t.data_ptr(), t.numel(), t.dtype, tuple(t.stride()), t._version)

    def digest(self, t: torch.Tensor) -> bytes:
        key = self._key(t)
        hit = self._memo.get(key)
        if hit is not None:
            return hit[1]
        h = digest(t)
        self.hashed_bytes += t.numel() * 4
        self._memo[key] = (t, h)
        return h

    def matches(self, t: torch.Tensor, commitment: bytes) -> bool:
        return self.digest(t) == bytes(commitment)

    def clear(self) -> None:
        self._memo.clear()
