"""In-process Collective: all peers live in this process, messages are references (no copies)."""

from __future__ import annotations

from typing import Any

from byztrain.comm.base import Collective, message_bytes


class LocalCollective(Collective):
    def all_gather(self, local: dict[int, Any], peers: list[int]) -> dict[int, Any]:
        fanout = max(len(peers) - 1, 0)
        for sender, msg in local.items() if self.accounting else ():
            size = message_bytes(msg)
            self.sent_bytes[sender] += size * fanout
            for p in peers:
                if p != sender:
                    self.received_bytes[p] += size
        return {p: local[p] for p in peers if p in local}

    def all_to_all(self, outgoing: dict[int, dict[int, Any]], peers: list[int]) -> dict[int, dict[int, Any]]:
        incoming: dict[int, dict[int, Any]] = {r: {} for r in peers}
        for sender, msgs in outgoing.items():
            for receiver, msg in msgs.items():
                if receiver not in incoming:
                    continue
                incoming[receiver][sender] = msg
                if receiver != sender and self.accounting:
                    size = message_bytes(msg)
                    self.sent_bytes[sender] += size
                    self.received_bytes[receiver] += size
        return incoming

    def barrier(self) -> None:
        pass
