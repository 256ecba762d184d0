"""Hash commitments over canonical tensor bytes.

A part's commitment is sha256 over its canonical bytes: float32, little-endian, C-contiguous, exactly the
k floats sent (padding included). The commitment is what a receiver checks a scattered part against and
what a validator compares its recomputation with, so it must not depend on memory layout, device or the
host's byte order: `canonical_bytes` normalises all three.

`DigestCache` memoises digests of unchanged tensors within one step: a tensor is identified by its data
pointer, length, dtype and autograd version counter (bumped by every in-place write to it or to any view
of its storage), and the cache holds a reference so the memory cannot be reused while cached. In the
simulator a receiver's part is the very tensor the sender hashed, so the receiver's check costs a
dictionary lookup; in the distributed runtime received tensors are fresh objects and get hashed. The memo is
sound only because no one rewrites a memoised tensor behind the version counter (through `.data`): honest
code does not, and attack hooks never hold the protocol's tensors (`Round.tamper` hands them copies and
copies what they return, so a Byzantine sender's parts are fresh tensors that get hashed).

Hashing many parts (`digest_many`, `DigestCache.digest_many`) spreads them over `torch.get_num_threads()`
threads: `hashlib` releases the GIL while it hashes a buffer, so sha256 runs on several cores at once. A
digest does not depend on which thread computed it. With one torch thread (sweep workers) nothing changes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

DIGEST_BYTES = 32
#: below this many bytes in one `digest_many` call the thread hand-off costs more than it saves
PARALLEL_MIN_BYTES = 1 << 20


def canonical_bytes(t: torch.Tensor) -> memoryview:
    """The canonical byte string of a float32 tensor: little-endian float32, C order, on the CPU."""
    if t.dtype != torch.float32:
        raise ValueError(f"commitments cover float32 tensors only, got {t.dtype}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    arr = t.numpy()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        arr = arr.astype("<f4")
    return memoryview(arr).cast("B")


def digest(t: torch.Tensor) -> bytes:
    """sha256 of `canonical_bytes(t)` (32 bytes)."""
    return hashlib.sha256(canonical_bytes(t)).digest()


_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of `workers` threads (rebuilt after a fork or a change of the thread count)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="byztrain-sha256"))
        return _pool[2]


def _sha256_all(bufs: list[memoryview]) -> list[bytes]:
    return [hashlib.sha256(b).digest() for b in bufs]


def digest_many(tensors: list[torch.Tensor], threads: int | None = None) -> list[bytes]:
    """`digest` of each tensor, in order; large batches are hashed by up to `threads` threads at once
    (default `torch.get_num_threads()`), the calling thread included."""
    bufs = [canonical_bytes(t) for t in tensors]
    workers = min(torch.get_num_threads() if threads is None else threads, len(bufs))
    total = sum(b.nbytes for b in bufs)
    if workers <= 1 or total < PARALLEL_MIN_BYTES:
        return _sha256_all(bufs)
    # contiguous chunks of about equal byte counts: one per thread
    bounds, acc, j = [0], 0, 1
    for i, b in enumerate(bufs):
        acc += b.nbytes
        if acc >= j * total / workers and len(bounds) < workers:
            bounds.append(i + 1)
            j += 1
    bounds.append(len(bufs))
    chunks = [bufs[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    pool = _executor(workers - 1)
    futures = [pool.submit(_sha256_all, c) for c in chunks[1:]]
    out = _sha256_all(chunks[0])
    for f in futures:
        out.extend(f.result())
    return out


def commit_parts(parts: list[torch.Tensor], cache: DigestCache | None = None) -> list[bytes]:
    """One commitment per part, in partition order."""
    return cache.digest_many(parts) if cache is not None else digest_many(parts)


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

    def digest_many(self, tensors: list[torch.Tensor]) -> list[bytes]:
        """`digest` of each tensor; the ones not memoised are hashed together (see `digest_many`)."""
        keys = [self._key(t) for t in tensors]
        out: list[bytes | None] = []
        todo: dict[tuple, int] = {}  # key -> index into tensors of its first occurrence
        for i, key in enumerate(keys):
            hit = self._memo.get(key)
            out.append(hit[1] if hit is not None else None)
            if hit is None and key not in todo:
                todo[key] = i
        if todo:
            fresh = digest_many([tensors[i] for i in todo.values()])
            for (key, i), h in zip(todo.items(), fresh, strict=True):
                self._memo[key] = (tensors[i], h)
                self.hashed_bytes += tensors[i].numel() * 4
            for i, key in enumerate(keys):
                if out[i] is None:
                    out[i] = self._memo[key][1]
        return out  # type: ignore[return-value]

    def matches(self, t: torch.Tensor, commitment: bytes) -> bool:
        return self.digest(t) == bytes(commitment)

    def clear(self) -> None:
        self._memo.clear()
