"""The Collective interface: the only way protocol code exchanges messages.

Protocol code is written SPMD-style over `comm.local_peers`: every call takes the messages of the peers
hosted by this process, keyed by peer id, and returns what those peers receive. In the simulator every peer
is local; in the distributed runtime each process hosts one. A missing entry means "sent nothing" (a silent
or crashed peer); receivers must treat absence as a protocol fault, never block on it.
"""

from __future__ import annotations

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


class Collective(ABC):
    def __init__(self, local_peers: list[int]):
        self.local_peers = list(local_peers)
        self.sent_bytes: dict[int, int] = defaultdict(int)
        self.received_bytes: dict[int, int] = defaultdict(int)

    @abstractmethod
    def all_gather(self, local: dict[int, Any], peers: list[int]) -> dict[int, Any]:
        """Broadcast each local peer's object to `peers`; return every participating peer's object."""

    @abstractmethod
    def all_to_all(self, outgoing: dict[int, dict[int, Any]], peers: list[int]) -> dict[int, dict[int, Any]]:
        """outgoing[sender][receiver] -> incoming[receiver][sender], for local receivers."""

    @abstractmethod
    def barrier(self) -> None: ...

    def take_byte_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """Bytes sent/received per local peer since the last call (per-step accounting)."""
        sent, recv = dict(self.sent_bytes), dict(self.received_bytes)
        self.sent_bytes.clear()
        self.received_bytes.clear()
        return sent, recv
