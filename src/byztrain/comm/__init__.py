"""Message passing between peers: one interface, an in-process and a torch.distributed implementation."""

from byztrain.comm.base import Collective, PeerExcluded
from byztrain.comm.local import LocalCollective

__all__ = ["Collective", "LocalCollective", "PeerExcluded"]
