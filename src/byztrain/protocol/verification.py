"""The aggregation check: CenteredClip's fixed-point identity projected on random directions.

After every aggregate ĝ[j] is public and only then, the peers run MPRNG and derive q Gaussian directions
z^1..z^q (each cut into parts like the gradient) from its output r_t. Peer i broadcasts, for every
partition j,

    s_ij^l = <z^l[j], g_i[j] - ĝ[j]>   and   d_ij = ||g_i[j] - ĝ[j]||,

computed in float64 from the exact float32 parts it committed to. Everyone checks, per partition j and
direction l, that the weighted sum R_j^l = sum_i min(1, tau / d_ij) * s_ij^l is ~0: at an exact
CenteredClip fixed point v*, sum_i min(1, tau/||g_i - v*||) (g_i - v*) = 0, so its projection on any
direction is 0. Aggregator j re-derives (s_ij, d_ij) from the parts it received and accuses peers whose
broadcast scalars differ (`scalars_agree`); everyone re-derives the aggregator's own row from the part it
revealed. A partition failing a test below goes to a dispute (byztrain.protocol.btard), never straight
to a ban.

Tests and tolerances (docs/protocol.md, sections 0 and 4.3, has the bounds and their measurements):

- Weighted sum: |R_j^l| <= check_rtol * sum_i min(d_ij, tau) (`clip_mass`, at most n * tau whatever anyone
  publishes). CenteredClip stops at ||r(v)|| <= cclip_tol * sum_i min(d_i, tau), and <z, r> ~ N(0, ||r||^2),
  so `default_check_rtol` = 10 x (cclip_tol + the float32 evaluation error) leaves ten standard deviations.
  A cheat delta shifts R by about <z, J delta>: it escapes a direction with probability about
  0.8 * check_rtol * sum_i min(d_ij, tau) / ||J delta||, and the check with that to the power q.
- Plausibility (`implausible`): |s_ij^l| <= bound * d_ij, which every honest row meets but with odds 2.6e-12
  at bound 7; it caps what a lying row can add to R_j at 7 * tau.
- Median rule (`off_centre`): bounds a cheat covered by colluding liars by the honest spread plus the pull
  CenteredClip concedes to b far rows.
- Scalar agreement: |s_rep - s_re| <= scalar_rtol * ||z[j]|| * d_ij and |d_rep - d_re| <= scalar_rtol *
  d_ij. Both sides compute from the same float32 bytes (the differences are exact in float64), so only the
  float64 summation order differs: error <= k * 2^-53 * ||z|| * d, far below the default 1e-8.
"""

from __future__ import annotations

import hashlib
import struct

import torch


def projection_seed(shared_random: int, step: int, attempt: int) -> int:
    """The seed of the check directions: hash of this step's MPRNG output, the step and the attempt."""
    blob = b"byztrain/z" + struct.pack("<QqQ", shared_random & (2**64 - 1), step, attempt)
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def draw_projections(seed: int, q: int, parts: int, part_size: int, device: torch.device | str = "cpu"):
    """(q, P, k) standard Gaussian directions in float32, identical on every peer for the same seed.

    Drawn on the CPU (the generator stream is device-specific) and moved to `device`.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(q, parts, part_size, generator=gen, dtype=torch.float32)
    return z.to(device)


def peer_scalars(
    parts: torch.Tensor, ghat: torch.Tensor, z64: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sender's scalars for every partition: parts (P, k) float32 (its padded gradient), ghat (P, k)
    float32 (the published aggregate), z64 (q, P, k) float64. Returns s (P, q) and d (P,), float64."""
    diff = parts.to(torch.float64).sub_(ghat)
    d = torch.linalg.vector_norm(diff, dim=1)
    s = torch.einsum("pk,qpk->pq", diff, z64)
    return s, d


def partition_scalars(
    rows: torch.Tensor, agg: torch.Tensor, z64: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """An aggregator's re-derivation for one partition: rows (n, k) float32 (the received parts), agg (k,)
    float32, z64 (q, k) float64. Returns s (n, q) and d (n,), float64."""
    diff = rows.to(torch.float64).sub_(agg)  # float32 -> float64 is exact, so is the difference
    d = torch.linalg.vector_norm(diff, dim=1)
    s = diff @ z64.T
    return s, d


def clip_weights(d: torch.Tensor, tau: float) -> torch.Tensor:
    """min(1, tau / d) in float64, 1 where d <= tau (no division by zero)."""
    d = d.to(torch.float64)
    return torch.where(d > tau, tau / d, torch.ones((), dtype=torch.float64, device=d.device))


def clip_mass(d: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_i min(d_ij, tau) over the rows of d (n, P): (P,) float64. The scale of the check; each term is
    at most tau, so no sender, and no aggregator through its output, can make it exceed n * tau."""
    return d.to(torch.float64).clamp(max=tau).sum(dim=0)


def default_check_rtol(cclip_tol: float, n: int) -> float:
    """10 x the honest residual bound: CenteredClip stops at ||r|| <= cclip_tol * mass, measured in float32
    with an error below (n + 2) * 2^-24 * mass; a Gaussian direction projects r to N(0, ||r||^2)."""
    return 10.0 * (cclip_tol + (n + 2) * 2.0**-24)


def off_centre(s: torch.Tensor, bound: float, tau: float) -> torch.Tensor:
    """(P,) bool: is the median over rows of s_ij^l off centre by more than `bound` x (the rows' spread +
    tau * b/(n - b)) for some direction l? s: (n, P, q); b = ceil(n/2) - 1, the most rows that can lie
    while the honest rows are a majority.

    s_ij^l - s_kj^l = <z^l, g_i[j] - g_k[j]> does not depend on ĝ[j], while a shift delta of ĝ[j] moves
    every s_ij^l by -<z^l, delta>: the median moves, the spread does not. The median (the mean of the two
    middle rows for even n) and the spread (the (n - b)-th smallest distance to it) stay within the
    honest rows' values whatever the liars report. Their honest offset from a true CenteredClip output is
    bounded too: b far rows pull it by at most about tau * b/(n - b) when the honest rows are within tau,
    and by about the honest spread when they are clipped; that is what the two terms allow. So a cheat
    covered by colluding liars is bounded by O(tau + honest spread), the pull CenteredClip concedes anyway.
    """
    n = s.shape[0]
    b = (n + 1) // 2 - 1
    srt = s.sort(dim=0).values
    med = (srt[(n - 1) // 2] + srt[n // 2]) / 2  # (P, q)
    spread = (s - med).abs().sort(dim=0).values[n - b - 1]
    return (med.abs() > bound * (spread + tau * b / (n - b))).any(dim=1)


def implausible(s: torch.Tensor, d: torch.Tensor, bound: float) -> torch.Tensor:
    """(P,) bool: does any row report |s_ij^l| > bound * d_ij? For z drawn after g_i[j] and ĝ[j] were
    fixed, s_ij^l ~ N(0, d_ij^2), so an honest row exceeds bound = 7 with odds 2.6e-12 per scalar."""
    return (s.abs() > bound * d[..., None]).any(dim=2).any(dim=0)


def scalars_agree(
    s_rep: torch.Tensor,
    d_rep: torch.Tensor,
    s_re: torch.Tensor,
    d_re: torch.Tensor,
    z_norm: torch.Tensor,
    rtol: float,
) -> torch.Tensor:
    """Per row: do the reported (s (m, q), d (m,)) agree with the re-derived ones? z_norm: (q,) norms of
    the directions restricted to the rows' partition(s), broadcastable against s. Returns (m,) bool."""
    s_tol = rtol * z_norm * d_re[:, None]
    s_ok = ((s_rep - s_re).abs() <= s_tol).all(dim=1)
    d_ok = (d_rep - d_re).abs() <= rtol * d_re
    return s_ok & d_ok


def is_scalar_message(msg: object, parts: int, q: int) -> bool:
    """A well-formed scalar broadcast: (s, d) float64 tensors of shapes (P, q) and (P,), finite, d >= 0."""
    if not (isinstance(msg, (tuple, list)) and len(msg) == 2):
        return False
    s, d = msg
    if not (isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor)):
        return False
    if s.dtype != torch.float64 or d.dtype != torch.float64:
        return False
    if tuple(s.shape) != (parts, q) or tuple(d.shape) != (parts,):
        return False
    return bool(torch.isfinite(s).all()) and bool(torch.isfinite(d).all()) and bool((d >= 0).all())
