"""Butterfly partition layout: one contiguous part of the flat gradient per aggregating peer.

The layout is a pure function of (d, aggregating peers in order), so every peer computes the same one
from public information. With P aggregators the flat vector of length d is zero-padded to P*k with
k = ceil(d / P) and cut into P contiguous parts of k floats; part j goes to the j-th aggregator (peers
sorted ascending). Padding sits at the end, so usually only the last part is padded; when d is tiny
compared with P several trailing parts can be partly or wholly padding. Padding is zeros on every
honest peer; a padded coordinate that is not zero in a received part is caught by the commitment (the
sender hashed what it sent) and by CenteredClip like any other coordinate, and is dropped on `join`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Layout:
    dim: int  # d: length of the flat gradient
    peers: tuple[int, ...]  # aggregators in partition order (ascending peer id)

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"Layout: dim must be >= 1, got {self.dim}")
        if not self.peers:
            raise ValueError("Layout: needs at least one aggregating peer")
        if list(self.peers) != sorted(set(self.peers)):
            raise ValueError(f"Layout: peers must be distinct and ascending, got {self.peers}")

    @property
    def parts(self) -> int:
        """P: number of parts (= aggregating peers)."""
        return len(self.peers)

    @property
    def part_size(self) -> int:
        """k = ceil(d / P)."""
        return -(-self.dim // self.parts)

    @property
    def padded(self) -> int:
        return self.parts * self.part_size

    def index(self, peer: int) -> int:
        """The partition aggregated by `peer`."""
        return self.peers.index(peer)

    def bounds(self, j: int) -> tuple[int, int]:
        """[start, stop) of part j in unpadded coordinates (stop - start < k for padded parts)."""
        k = self.part_size
        return min(j * k, self.dim), min((j + 1) * k, self.dim)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The P parts of a flat (d,) vector: views where no padding is needed, zero-padded copies
        otherwise. Every part is contiguous, shape (k,), same dtype and device as `flat`."""
        if flat.shape != (self.dim,):
            raise ValueError(f"Layout.split: expected shape ({self.dim},), got {tuple(flat.shape)}")
        k = self.part_size
        out = []
        for j in range(self.parts):
            a, b = self.bounds(j)
            if b - a == k:
                out.append(flat[a:b])
            else:
                part = torch.zeros(k, dtype=flat.dtype, device=flat.device)
                part[: b - a] = flat[a:b]
                out.append(part)
        return out

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """(P, k) zero-padded copy of a flat (d,) vector (row j = part j)."""
        if flat.shape != (self.dim,):
            raise ValueError(f"Layout.pad: expected shape ({self.dim},), got {tuple(flat.shape)}")
        out = torch.zeros(self.padded, dtype=flat.dtype, device=flat.device)
        out[: self.dim] = flat
        return out.view(self.parts, self.part_size)

    def join(self, parts: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Inverse of split/pad: parts (P, k) or a list of P (k,) tensors -> flat (d,), padding dropped."""
        if isinstance(parts, (list, tuple)):
            if len(parts) != self.parts:
                raise ValueError(f"Layout.join: expected {self.parts} parts, got {len(parts)}")
            parts = torch.stack(list(parts))
        if parts.shape != (self.parts, self.part_size):
            raise ValueError(
                f"Layout.join: expected shape ({self.parts}, {self.part_size}), got {tuple(parts.shape)}"
            )
        return parts.reshape(-1)[: self.dim]


@lru_cache(maxsize=64)
def layout_for(dim: int, peers: tuple[int, ...]) -> Layout:
    """The layout for aggregators `peers` (sorted here, so every peer gets the same one)."""
    return Layout(dim, tuple(sorted(peers)))
