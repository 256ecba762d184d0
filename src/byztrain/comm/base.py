"""The Collective interface: the only way protocol code exchanges messages.

Protocol code is written SPMD-style over `comm.local_peers`: every call takes the messages of the peers
hosted by this process, keyed by peer id, and returns what those peers receive. In the simulator every peer
is local; in the distributed runtime each process hosts one. A missing entry means "sent nothing" (a silent
or crashed peer); receivers must treat absence as a protocol fault, never block on it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Any

import torch


def message_bytes(obj: Any) -> int:
    """Size used for byte accounting: tensor payloads exactly, small objects approximately."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(message_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(message_bytes(v) for v in obj)
    return 8


class PeerExcluded(RuntimeError):
    """Raised in a process whose peers are all left out of an all-gather: the others have banned them (or
    count them as crashed), so this process has nothing more to take part in. The runtime stops it."""


class Collective(ABC):
    def __init__(self, local_peers: list[int]):
        self.local_peers = list(local_peers)
        self.sent_bytes: dict[int, int] = defaultdict(int)
        self.received_bytes: dict[int, int] = defaultdict(int)
        self.accounting = True  # False inside `unaccounted()`

    @contextlib.contextmanager
    def unaccounted(self):
        """Messages inside this block are not counted (e.g. the honest gradients an omniscient adversary is
        given: they model the adversary's knowledge, not traffic of the protocol)."""
        previous, self.accounting = self.accounting, False
        try:
            yield
        finally:
            self.accounting = previous

    @abstractmethod
    def all_gather(self, local: dict[int, Any], peers: list[int]) -> dict[int, Any]:
        """Broadcast each local peer's object to `peers`; return every participating peer's object."""

    @abstractmethod
    def all_to_all(self, outgoing: dict[int, dict[int, Any]], peers: list[int]) -> dict[int, dict[int, Any]]:
        """outgoing[sender][receiver] -> incoming[receiver][sender], for local receivers."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every current member has reached the barrier (members: the peers of the last
        all-gather; a member that does not arrive within the timeout counts as crashed)."""

    def take_byte_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """Bytes sent/received per local peer since the last call (per-step accounting)."""
        sent, recv = dict(self.sent_bytes), dict(self.received_bytes)
        self.sent_bytes.clear()
        self.received_bytes.clear()
        return sent, recv
