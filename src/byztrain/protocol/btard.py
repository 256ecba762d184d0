"""One BTARD-SGD step, written SPMD-style over `comm.local_peers`: one method per phase of docs/protocol.md.

    roles -> gradients -> commit -> scatter -> CenteredClip -> all-gather -> MPRNG -> check [-> dispute]
          -> validation and accusations

The optimizer step with the returned update is the trainer's; r_t is returned as
`StepResult.shared_random` and seeds step t+1's minibatches and validators.

Names from the paper: g_i[j] is part j of worker i's gradient, ĝ[j] the aggregate of partition j,
z the check directions drawn from r_t, s_ij = <z[j], g_i[j] - ĝ[j]> and d_ij = ||g_i[j] - ĝ[j]|| the check
scalars, τ the CenteredClip radius, w_ij = min(1, τ / d_ij) the clip weights.

Aggregation attempts: any ban during phases commit..check aborts the attempt and the aggregation reruns
without the banned peers (new layout, commitments, CenteredClip, MPRNG, directions); gradients are not
recomputed. The update applied is always one whose check passed with no ban in its attempt. Each rerun
costs the attackers a peer. Bans from validation and accusations of earlier steps do not restart: the
aggregate passed its check and the banned peer's part in it is bounded by CenteredClip (no rollback).

The adversary enters through one door, `Round.tamper`; the code here is the honest protocol. Every
message is checked as a receiver would check it on the wire, so a malformed hook result bans its peer.
In the simulator all peers are local: the local partitions' CenteredClips run in one call, and a decision
every peer takes from the same public data (a ban, a verdict) is computed once.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from byztrain.aggregators import centered_clip_irls_batched
from byztrain.config import Config
from byztrain.defenses import Defense, StepResult
from byztrain.errors import ConfigError
from byztrain.protocol.bans import (
    MALFORMED,
    Accusation,
    StepRecord,
    audit,
    is_peer_id,
    part_fault,
    resolve,
    rows_finite,
)
from byztrain.protocol.commitments import DigestCache, is_commitment_list
from byztrain.protocol.mprng import run_mprng
from byztrain.protocol.partition import Layout, layout_for
from byztrain.protocol.validators import choose_validators
from byztrain.protocol.verification import (
    clip_mass,
    clip_weights,
    default_check_rtol,
    draw_projections,
    implausible,
    is_scalar_message,
    off_centre,
    partition_scalars,
    peer_scalars,
    projection_seed,
    scalars_agree,
)
from byztrain.registry import DEFENSES, Choice, Entry, Int, Param, Real

if TYPE_CHECKING:
    from byztrain.runtime.round import Round

MEDIANS = ("lower", "upper", "average")
#: smallest tau btard accepts: float32 clip weights tau / d stay normal numbers for any part norm we meet
MIN_TAU = 1e-20
#: the median rule needs this many workers: below, the honest rows' spread is too noisy (simulated honest
#: partitions of 6 rows exceeded median_bound = 8 in 3e-4 of 30,000 directions, of 8 rows in none; measured
#: without the tau term, which only lowers these)
MEDIAN_RULE_MIN_ROWS = 8
#: smallest cclip_tol: the stopping rule is evaluated in float32 (resolution 2^-23)
MIN_CCLIP_TOL = 1e-7

PARAMS = (
    Param(
        "check_rtol", Real(0, open_low=True), None,
        "relative tolerance of the projected fixed-point check (null: 10 (cclip_tol + (n+2) 2^-24))",
    ),
    Param("check_projections", Int(1), 3, "number q of random directions z per check"),
    Param("scalar_rtol", Real(0, open_low=True), 1e-8, "relative tolerance when an aggregator re-derives s_ij, d_ij"),
    Param(
        "scalar_bound", Real(5), 7.0,
        "|s_ij| above this many d_ij sends the partition to a dispute (honest |s| > 5 d has odds 6e-7)",
    ),
    Param(
        "median_bound", Real(4), 8.0,
        "a median s_ij this many times the rows' spread off 0 sends the partition to a dispute "
        "(honest partitions of 8 rows reach 7)",
    ),
    Param("median", Choice(MEDIANS), "lower", "CenteredClip start for even n: lower (as torch.median), upper or average"),
)


def _params(config: Config) -> dict:
    d = config.defense
    if not (math.isfinite(d.tau) and d.tau >= MIN_TAU):
        raise ConfigError(
            "defense.tau", f"btard needs a finite tau >= {MIN_TAU:g} (the check weights use it), got {d.tau}"
        )
    if d.cclip_tol < MIN_CCLIP_TOL:
        raise ConfigError(
            "defense.cclip_tol",
            f"btard's CenteredClip cannot meet a tolerance below {MIN_CCLIP_TOL:g} in float32, got {d.cclip_tol}",
        )
    return DEFENSES["btard"].bind(d.params, "defense.params")


def _check_config(config: Config) -> None:
    """BTARD's preconditions on the whole config (peers, byzantine, validators) and its parameters."""
    n, b, m = config.peers, config.byzantine, config.defense.validators
    if 2 * b >= n:
        raise ConfigError("byzantine", f"btard tolerates fewer than half Byzantine peers: need byzantine < peers/2 ({n}/2), got {b}")
    if 2 * b >= n - m:
        # Validators sit out the aggregation, so in the worst case every Byzantine peer aggregates among
        # `peers - validators` workers. At half or more, CenteredClip has no honest majority and stops
        # converging, and the fixed-point check then convicts honest aggregators.
        raise ConfigError(
            "byzantine",
            f"btard needs byzantine < (peers - defense.validators)/2 = ({n} - {m})/2, got {b}: lower byzantine "
            f"or validators, or add peers",
        )
    if m >= n - 1:
        raise ConfigError("defense.validators", f"must be < peers - 1 ({n - 1}) so someone still aggregates, got {m}")
    if config.defense.pre:
        raise ConfigError("defense.pre", "btard takes no pre-aggregators (it clips per partition)")
    _params(config)


@dataclass
class Attempt:
    """What one aggregation attempt builds, phase by phase (this process's view)."""

    index: int
    workers: list[int]  # senders and aggregators, ascending; partition jj belongs to workers[jj]
    layout: Layout
    record: StepRecord
    my_parts: dict[int, list[torch.Tensor]]  # local worker -> its P parts
    aggs: list[int]  # local aggregators
    bans_before: int
    X: torch.Tensor | None = None  # (len(aggs), n, k): the rows of each local partition
    own: dict[int, torch.Tensor] = field(default_factory=dict)  # local aggregator -> its accepted own part
    own_parts: torch.Tensor | None = None  # (P, k): every aggregator's own part, as it revealed it
    values: torch.Tensor | None = None  # (len(aggs), k): local CenteredClip results
    shared_random: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.workers)

    def aborted(self, rnd: Round) -> bool:
        return len(rnd.banned_now) > self.bans_before


class BtardDefense(Defense):
    """BTARD-SGD: butterfly CenteredClip with commitments, MPRNG, random-projection checks, disputes,
    validators and ACCUSE-based bans. See the module docstring and docs/protocol.md."""

    name = "btard"
    needs_history = True  # validators recompute the previous step's gradients at its parameters

    def __init__(self, config: Config):
        super().__init__(config)
        p = _params(config)
        d = config.defense
        self.tau = float(d.tau)
        self.cclip_tol = float(d.cclip_tol)
        self.cclip_max_iters = int(d.cclip_max_iters)
        self.validators = int(d.validators)
        self.check_rtol = p["check_rtol"]  # None: derived from n in each attempt
        self.q = p["check_projections"]
        self.scalar_rtol = p["scalar_rtol"]
        self.scalar_bound = p["scalar_bound"]
        self.median_bound = p["median_bound"]
        self.median = p["median"]
        self.cache = DigestCache()
        self.record: StepRecord | None = None  # the previous step's final record (validators audit it)
        self.timings: dict[str, float] = defaultdict(float)  # seconds per phase, summed over steps
        self._grad_memo: dict[tuple[int, int], torch.Tensor] = {}

    # ---- the step --------------------------------------------------------------------------------
    def step(self, rnd: Round) -> StepResult:
        self.cache.clear()
        self._grad_memo = {}
        t0 = time.perf_counter()
        pairs, prev = self._roles(rnd)
        sitting_out = {v for v, _ in pairs}
        workers0 = [p for p in rnd.active if p not in sitting_out]
        rows = self._gradients(rnd, workers0)
        self._tick("gradients", t0)

        outcome = None
        for index in range(len(workers0) + 1):
            workers = [p for p in workers0 if not rnd.is_banned(p)]
            if not workers:
                break
            outcome = self._attempt(rnd, index, workers, rows)
            if outcome is not None:
                break
            rnd.emit("restart", reason=f"aggregation attempt {index} aborted by bans; rerunning without them")
        if outcome is None:
            raise RuntimeError(f"btard step {rnd.step}: no aggregation attempt succeeded")

        t0 = time.perf_counter()
        stats = outcome.stats
        stats.update(self._validate(rnd, pairs, prev, outcome.record))
        self._tick("validate", t0)
        stats["btard_validators"] = len(pairs)
        stats["bans"] = len(rnd.banned_now)
        self.record = outcome.record
        self._grad_memo = {}
        update = outcome.layout.join(outcome.record.ghat)
        return StepResult(update=update, stats=stats, shared_random=outcome.shared_random)

    def _attempt(self, rnd: Round, index: int, workers: list[int], rows: dict[int, torch.Tensor]):
        """Phases commit..check once; the Attempt, or None when a ban aborted it (the caller reruns)."""
        local = set(rnd.comm.local_peers)
        layout = layout_for(rnd.workload.dim, tuple(workers))
        a = Attempt(
            index=index,
            workers=workers,
            layout=layout,
            record=StepRecord(rnd.step, index, layout, scalar_rtol=self.scalar_rtol),
            my_parts={p: layout.split(rows[p]) for p in workers if p in local},
            aggs=[j for j in workers if j in local],
            bans_before=len(rnd.banned_now),
        )
        phases = (self._commit, self._scatter, self._centered_clip, self._all_gather, self._mprng, self._check)
        for phase in phases:
            t0 = time.perf_counter()
            phase(rnd, a)
            self._tick(phase.__name__[1:], t0)
            if a.aborted(rnd):
                return None
        return a

    # ---- 0-1. roles and gradients ---------------------------------------------------------------
    def _roles(self, rnd: Round):
        """This step's (validator, target) pairs from r_{t-1}, and the record the validators audit."""
        prev = self.record
        if prev is not None and (rnd.previous is None or rnd.previous.step != prev.step):
            prev = None  # no parameters to recompute that step with
        pairs = choose_validators(
            rnd.shared_random, rnd.step, rnd.active, prev.layout.peers if prev else None, self.validators
        )
        return pairs, prev

    @staticmethod
    def _gradients(rnd: Round, workers: list[int]) -> dict[int, torch.Tensor]:
        mine = [p for p in workers if p in set(rnd.comm.local_peers)]
        grads = rnd.sent_gradients(mine, senders=workers) if mine else None
        return {p: grads[i] for i, p in enumerate(mine)}

    # ---- 2. split and commit; barrier ------------------------------------------------------------
    def _commit(self, rnd: Round, a: Attempt) -> None:
        P = a.layout.parts
        # every local sender's parts hashed in one batch (threads share the sha256 work)
        flat = self.cache.digest_many([part for parts in a.my_parts.values() for part in parts])
        commits = {p: flat[i * P : (i + 1) * P] for i, p in enumerate(a.my_parts)}
        for p, c in _broadcast(rnd, commits, a.workers, "commitments", lambda c: is_commitment_list(c, P)):
            a.record.commitments[p] = [bytes(x) for x in c]
        if not a.aborted(rnd):
            rnd.comm.barrier()

    # ---- 3. scatter part j -> aggregator j; complaints ---------------------------------------------
    def _scatter(self, rnd: Round, a: Attempt) -> None:
        outgoing = {}
        for p, parts in a.my_parts.items():
            msg = {a.layout.peers[j]: parts[j] for j in range(a.layout.parts)}
            sent = rnd.tamper(p, "on_send_parts", msg, msg)
            outgoing[p] = sent if isinstance(sent, dict) else {}
        incoming = rnd.comm.all_to_all(outgoing, a.workers)
        complaints = self._receive_parts(rnd, a, incoming)
        resend = self._resolve_complaints(rnd, a, complaints)
        if resend:
            self._public_resend(rnd, a, resend)

    def _receive_parts(self, rnd: Round, a: Attempt, incoming: dict) -> dict[int, list]:
        """Each local aggregator copies the parts that match their commitments into its rows of X; its
        complaints list the missing and the faulty ones (a faulty part travels as the evidence)."""
        n, k = a.n, a.layout.part_size
        device = rnd.workload.device
        a.X = torch.empty(len(a.aggs), n, k, dtype=torch.float32, device=device)
        complaints: dict[int, list] = {}
        for row, j in enumerate(a.aggs):
            jj = a.layout.index(j)
            inbox = incoming.get(j, {})
            mine, accepted = [], []
            for r, i in enumerate(a.workers):
                msg = inbox.get(i)
                if msg is None:
                    mine.append((i, "missing", None))
                    continue
                fault = self._part_fault(msg, a, i, jj, device, finite=False)
                if fault is not None:
                    mine.append((i, fault, msg))  # the signed message itself is the evidence
                else:
                    accepted.append((r, i, msg))
                    if i == j:
                        a.own[j] = msg
            if len(accepted) == n:
                torch.stack([m for _, _, m in accepted], out=a.X[row])
            else:
                for r, _, msg in accepted:
                    a.X[row, r].copy_(msg)
            finite = rows_finite(a.X[row])  # once per block, not per part
            if not bool(finite.all()):
                mine += [(i, "part has non-finite values", msg) for r, i, msg in accepted if not bool(finite[r])]
            complaints[j] = mine
        return complaints

    def _resolve_complaints(self, rnd: Round, a: Attempt, complaints: dict) -> dict[int, list[int]]:
        """Everyone judges the broadcast complaints; returns sender -> receivers that asked for a resend."""
        device = rnd.workload.device
        resend: dict[int, list[int]] = defaultdict(list)
        for j, lst in _broadcast(rnd, complaints, a.workers, "complaint list", _is_list):
            for entry in lst:
                if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and is_peer_id(entry[0])):
                    rnd.ban(j, "malformed complaint")
                    break
                i, why, evidence = entry
                if i not in a.workers or rnd.is_banned(i) or rnd.is_banned(j):
                    continue
                rnd.emit("complaint", peer=i, by=j, reason=str(why))
                if evidence is None:
                    resend[i].append(j)
                    continue
                fault = self._part_fault(evidence, a, i, a.layout.index(j), device)
                if fault is not None:
                    rnd.ban(i, f"scattered part for {j}: {fault}", by=j)
                else:
                    rnd.ban(j, f"false complaint against {i}: the evidence matches its commitment", by=i)
        return resend

    def _public_resend(self, rnd: Round, a: Attempt, resend: dict[int, list[int]]) -> None:
        """Parts a receiver says never arrived: the sender must broadcast them; silence or a mismatch bans
        it (now provable: everyone saw the broadcast or its absence)."""
        out = {}
        for i, receivers in resend.items():
            if i in a.my_parts:
                msg = {r: a.my_parts[i][a.layout.index(r)] for r in receivers}
                out[i] = rnd.tamper(i, "on_send_parts", msg, msg)
        got = rnd.comm.all_gather(out, _participants(rnd))
        for i in sorted(resend):
            if rnd.is_banned(i):
                continue
            msg = got.get(i)
            for r in resend[i]:
                part = msg.get(r) if isinstance(msg, dict) else None
                if part is None:
                    rnd.ban(i, f"silent: sent no part to {r}, not even when asked publicly", by=r)
                    break
                fault = self._part_fault(part, a, i, a.layout.index(r), rnd.workload.device)
                if fault is not None:
                    rnd.ban(i, f"publicly resent part for {r}: {fault}", by=r)
                    break
                if r in a.aggs:
                    a.X[a.aggs.index(r), a.workers.index(i)].copy_(part)
                    if r == i:
                        a.own[r] = part

    # ---- 4. CenteredClip on every local partition ------------------------------------------------
    def _centered_clip(self, rnd: Round, a: Attempt) -> None:
        if not a.aggs:
            return
        a.values, cstats = centered_clip_irls_batched(
            a.X, self.tau, tol=self.cclip_tol, max_iters=self.cclip_max_iters, median=self.median
        )
        iters = cstats["iterations"].to(torch.float64)
        a.stats.update(
            cclip_iters_mean=float(iters.mean()),
            cclip_iters_max=int(cstats["iterations"].max()),
            cclip_clipped=int(cstats["clipped"].sum()),
            cclip_unconverged=int((~cstats["converged"]).sum()),
        )

    # ---- 5. all-gather the aggregates, each with its aggregator's own part -------------------------
    def _all_gather(self, rnd: Round, a: Attempt) -> None:
        """Aggregator j publishes (ĝ[j], g_j[j]). Its own part rides along so that everyone re-derives
        s_jj and d_jj, the one row of partition j that only j could otherwise vouch for."""
        P, k = a.layout.parts, a.layout.part_size
        device = rnd.workload.device
        publish = {}
        for row, j in enumerate(a.aggs):
            v = rnd.tamper(j, "on_aggregate", a.values[row], a.layout.index(j), a.values[row])
            publish[j] = (v, a.own.get(j))
        ghat = torch.zeros(P, k, dtype=torch.float32, device=device)
        own = torch.zeros(P, k, dtype=torch.float32, device=device)
        for j, msg in _broadcast(rnd, publish, a.workers, "aggregate", lambda m: isinstance(m, tuple) and len(m) == 2):
            jj = a.layout.index(j)
            fault = part_fault(msg[0], k, device, finite=False)
            if fault is None:
                fault = self._part_fault(msg[1], a, j, jj, device)
                fault = None if fault is None else f"own part: {fault}"
            if fault is not None:
                rnd.ban(j, f"aggregate of partition {jj}: {fault}")
                continue
            ghat[jj], own[jj] = msg
        for jj in torch.nonzero(~rows_finite(ghat)).flatten().tolist():
            rnd.ban(a.layout.peers[jj], f"aggregate of partition {jj}: non-finite values")
        a.record.ghat, a.own_parts = ghat, own

    # ---- 6. MPRNG: r_t, drawn only now that every aggregate is public ------------------------------
    def _mprng(self, rnd: Round, a: Attempt) -> None:
        res = run_mprng(
            rnd.comm,
            rnd.step,
            _participants(rnd),
            secret=lambda peer, rd: rnd.mprng_secret(peer, rd, a.index),
            reveal=lambda peer, secret: rnd.tamper(peer, "on_mprng_reveal", secret, secret),
            on_ban=lambda peer, why: rnd.ban(peer, why),
        )
        if res.rounds > 1:
            rnd.emit("mprng_rerun", reason=f"{res.rounds - 1} rerun(s) after bans", banned=sorted(res.banned))
        a.shared_random = res.value
        a.stats.update(attempts=a.index + 1, mprng_rounds=res.rounds, btard_workers=a.n)

    # ---- 7. random-projection check ----------------------------------------------------------------
    def _check(self, rnd: Round, a: Attempt) -> None:
        """Broadcast s_ij, d_ij; aggregators accuse liars; everyone tests each partition's weighted sum and
        the scalars' plausibility; a partition failing either goes to a dispute."""
        rec, P = a.record, a.layout.parts
        device = rnd.workload.device
        rec.z = draw_projections(projection_seed(a.shared_random, rnd.step, a.index), self.q, P, a.layout.part_size, device)
        z64 = rec.z.to(torch.float64)
        derived = {}  # partition -> (s (n, q), d (n,)) re-derived by its local aggregator
        for row, j in enumerate(a.aggs):
            jj = a.layout.index(j)
            derived[jj] = partition_scalars(a.X[row], rec.ghat[jj], z64[:, jj])
        scal = {}
        for p, honest in self._my_scalars(a, derived, z64, device).items():
            # an aggregator's own knowledge: the parts of its partition (and the public aggregate and z)
            view = None
            if p in a.aggs:
                jj = a.layout.index(p)
                view = {"partition": jj, "row": a.workers.index(p), "partition_rows": a.X[a.aggs.index(p)],
                        "aggregate": rec.ghat[jj], "z": rec.z[:, jj]}
            scal[p] = rnd.tamper(p, "on_check_scalars", honest, *honest, extra=view)
        for p, msg in _broadcast(rnd, scal, a.workers, "check scalars", lambda m: is_scalar_message(m, P, self.q)):
            rec.scalars[p] = (msg[0], msg[1])
        if a.aborted(rnd):
            return
        S = torch.stack([rec.scalars[i][0] for i in a.workers])  # (n, P, q)
        D = torch.stack([rec.scalars[i][1] for i in a.workers])  # (n, P)
        self._check_own_rows(rnd, a, S, D, z64)
        self._resolve(rnd, self._scalar_accusations(rnd, a, S, D, derived), {rnd.step: rec})
        if a.aborted(rnd):
            return
        disputed = self._failing_partitions(rnd, a, S, D)
        if disputed:
            self._dispute(rnd, a, disputed, S, D, z64)

    def _my_scalars(self, a: Attempt, derived: dict, z64: torch.Tensor, device) -> dict:
        """(s (P, q), d (P,)) of every local worker. A row an aggregator here accepted holds exactly the
        committed bytes, so its scalars come from the aggregator's derivation instead of a second pass."""
        P = a.layout.parts
        shared = sorted(derived)
        others = [jj for jj in range(P) if jj not in derived]
        if shared:
            S_loc = torch.stack([derived[jj][0] for jj in shared], dim=1)  # (n, |shared|, q)
            D_loc = torch.stack([derived[jj][1] for jj in shared], dim=1)  # (n, |shared|)
        out = {}
        for p, parts in a.my_parts.items():
            r = a.workers.index(p)
            s = torch.empty(P, self.q, dtype=torch.float64, device=device)
            d = torch.empty(P, dtype=torch.float64, device=device)
            if shared:
                s[shared], d[shared] = S_loc[r], D_loc[r]
            if others:
                s[others], d[others] = peer_scalars(
                    torch.stack([parts[jj] for jj in others]), a.record.ghat[others], z64[:, others]
                )
            out[p] = (s, d)
        return out

    def _check_own_rows(self, rnd: Round, a: Attempt, S, D, z64) -> None:
        """Everyone re-derives each aggregator's scalars for its own partition from the revealed part."""
        s_own, d_own = peer_scalars(a.own_parts, a.record.ghat, z64)  # row jj: aggregator jj's own part
        rows = torch.tensor([a.workers.index(j) for j in a.layout.peers], device=S.device)
        idx = torch.arange(a.layout.parts, device=S.device)
        z_norms = a.record.z_norms(z64)
        ok = scalars_agree(S[rows, idx], D[rows, idx], s_own, d_own, z_norms, self.scalar_rtol)
        for jj in torch.nonzero(~ok).flatten().tolist():
            rnd.ban(a.layout.peers[jj], f"check scalars for its own partition {jj} differ from its revealed part")

    def _scalar_accusations(self, rnd: Round, a: Attempt, S, D, derived) -> dict[int, list]:
        """Each local aggregator accuses the workers whose broadcast scalars for its partition differ from
        its re-derivation; the lists are broadcast (silent or malformed lists ban their sender)."""
        z_norms = a.record.z_norms()
        accuse = {}
        for j in a.aggs:
            jj = a.layout.index(j)
            s_re, d_re = derived[jj]
            ok = scalars_agree(S[:, jj], D[:, jj], s_re, d_re, z_norms[jj], self.scalar_rtol)
            lst: list | str = []
            for r in torch.nonzero(~ok).flatten().tolist():
                why = f"check scalars for partition {jj} differ from the part it sent"
                report = rnd.tamper(j, "on_report", True, a.workers[r], why)
                if report is MALFORMED:
                    lst = MALFORMED
                    break
                if report:
                    lst.append((a.workers[r], why, rnd.step))
            accuse[j] = lst
        return dict(_broadcast(rnd, accuse, a.workers, "accusation list", _is_list))

    def _failing_partitions(self, rnd: Round, a: Attempt, S, D) -> list[int]:
        """Partitions to settle in public: the weighted sum exceeds its tolerance (a wrong aggregate, or
        CenteredClip stopped short), a scalar no honest draw of z gives, or the scalars' median is off
        centre (a wrong aggregate hidden by colluding liars: docs/protocol.md)."""
        rtol = self.check_rtol if self.check_rtol is not None else default_check_rtol(self.cclip_tol, a.n)
        W = clip_weights(D, self.tau)  # (n, P)
        R = (W[..., None] * S).sum(dim=0)  # (P, q)
        rel = R.abs().amax(dim=1) / clip_mass(D, self.tau).clamp_min(1e-300)  # |R| / sum_i min(d_ij, tau)
        reasons = {
            "weighted sum": rel > rtol,
            f"a scalar |s_ij| > {self.scalar_bound:g} d_ij": implausible(S, D, self.scalar_bound),
        }
        if a.n >= MEDIAN_RULE_MIN_ROWS:
            reasons[f"median s_ij > {self.median_bound:g} x (spread + tau b/(n-b))"] = off_centre(
                S, self.median_bound, self.tau
            )
        mass = (W[..., None] * S.abs()).sum(dim=0)
        a.stats.update(
            check_residual_max=float(rel.max()),
            check_ratio_max=float((R.abs() / mass.clamp_min(1e-300)).amax()),
        )
        failing = []
        for jj, j in enumerate(a.layout.peers):
            why = [name for name, hit in reasons.items() if bool(hit[jj])]
            if why:
                text = f"partition {jj}: " + ", ".join(why) + f" (|sum_i w_ij s_ij| / sum_i min(d_ij, tau) = {rel[jj]:.2e}, check_rtol {rtol:.1e})"
                rnd.emit("check_failed", peer=j, reason=text, partition=jj, residual=float(rel[jj]))
                failing.append(jj)
        return failing

    # ---- 7b. dispute: the partition in public --------------------------------------------------------
    def _dispute(self, rnd: Round, a: Attempt, disputed: list[int], S, D, z64) -> None:
        """Every worker broadcasts its part of each disputed partition; everyone checks the parts against
        the commitments, re-derives every s_ij and d_ij, and reruns CenteredClip. Liars and an aggregator
        whose ĝ[j] differs from the rerun are banned; an aggregate equal to the rerun stands (the check
        failed on numerics, which costs this broadcast and nobody a ban)."""
        device = rnd.workload.device
        k = a.layout.part_size
        reveal = {}
        for p, parts in a.my_parts.items():
            msg = {a.layout.peers[jj]: parts[jj] for jj in disputed}
            reveal[p] = rnd.tamper(p, "on_send_parts", msg, msg)
        got = dict(_broadcast(rnd, reveal, a.workers, "disputed parts", lambda m: isinstance(m, dict)))
        z_norms = a.record.z_norms()
        for jj in disputed:
            j = a.layout.peers[jj]
            rows = torch.empty(a.n, k, dtype=torch.float32, device=device)
            for r, i in enumerate(a.workers):
                part = got[i].get(j) if i in got else None
                fault = "silent" if part is None else self._part_fault(part, a, i, jj, device)
                if fault is not None:
                    rnd.ban(i, f"part for disputed partition {jj}: {fault}")
                else:
                    rows[r] = part
            if a.aborted(rnd):
                return
            s_re, d_re = partition_scalars(rows, a.record.ghat[jj], z64[:, jj])
            ok = scalars_agree(S[:, jj], D[:, jj], s_re, d_re, z_norms[jj], self.scalar_rtol)
            for r in torch.nonzero(~ok).flatten().tolist():
                rnd.ban(a.workers[r], f"check scalars for disputed partition {jj} differ from its public part")
            rerun, _ = centered_clip_irls_batched(
                rows[None], self.tau, tol=self.cclip_tol, max_iters=self.cclip_max_iters, median=self.median
            )
            if not torch.equal(rerun[0], a.record.ghat[jj]):
                rnd.ban(j, f"aggregate of disputed partition {jj} differs from CenteredClip of its public parts")
            elif bool(ok.all()):
                rnd.emit("dispute_cleared", peer=j, partition=jj,
                         reason=f"partition {jj}: the aggregate is CenteredClip of the public parts")

    # ---- 8-9. validation and accusations ---------------------------------------------------------
    def _validate(self, rnd: Round, pairs, prev: StepRecord | None, record: StepRecord) -> dict:
        """Validators recompute their targets' step t-1 gradients and accuse on mismatch; attackers may add
        accusations of their own. Every accusation is resolved by everyone recomputing the accused."""
        local = set(rnd.comm.local_peers)
        gradient_of = self._gradient_of(rnd)
        out: dict[int, list] = {p: [] for p in _participants(rnd) if p in local}
        for v, target in pairs:
            if v not in out or target is None or rnd.is_banned(target):
                continue
            guilt, _ = audit(prev, target, gradient_of(target, prev.step), self.cache)
            if guilt is None:
                continue
            report = rnd.tamper(v, "on_report", True, target, guilt)
            if report is MALFORMED:
                out[v] = MALFORMED
            elif report and out[v] is not MALFORMED:
                out[v].append((target, f"validation: {guilt}", prev.step))
        for p in out:
            extra = rnd.tamper(p, "accusations", [])
            if extra is MALFORMED or out[p] is MALFORMED:
                out[p] = MALFORMED
            else:  # an attacker's (target, reason) pairs become wire entries about this step
                out[p] += [(e[0], str(e[1]), rnd.step) if _is_pair(e) else MALFORMED for e in extra]
        records = {record.step: record} | ({prev.step: prev} if prev is not None else {})
        lists = dict(_broadcast(rnd, out, _participants(rnd), "accusation list", _is_list))
        n_acc = self._resolve(rnd, lists, records)
        return {"validator_pairs": sum(1 for _, t in pairs if t is not None), "accusations": n_acc}

    def _resolve(self, rnd: Round, lists: dict[int, list], records: dict[int, StepRecord]) -> int:
        """ACCUSE for every (accused, reason, step) entry: everyone recomputes the accused's gradient of
        that step; the accused is banned if its record differs, the accuser otherwise. Returns the count."""
        gradient_of = self._gradient_of(rnd)
        count = 0
        for p, lst in lists.items():
            for entry in lst:
                if rnd.is_banned(p):
                    break
                if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and is_peer_id(entry[0])
                        and is_peer_id(entry[2]) and entry[2] in records):
                    rnd.ban(p, "malformed accusation")
                    break
                accused, why, step = entry
                if accused == p or accused not in rnd.active or rnd.is_banned(accused):
                    continue
                count += 1
                rnd.emit("accuse", peer=accused, by=p, reason=str(why), accused_step=step)
                guilty, verdict, _ = resolve(Accusation(p, accused, step, str(why)), records, gradient_of, self.cache)
                rnd.ban(guilty, verdict, by=p if guilty == accused else accused)
        return count

    # ---- helpers ---------------------------------------------------------------------------------
    def _part_fault(self, msg, a: Attempt, sender: int, jj: int, device, *, finite: bool = True) -> str | None:
        """Why a received part of `sender` for partition jj is not the one it committed to (None if it is)."""
        fault = part_fault(msg, a.layout.part_size, device, finite=finite)
        if fault is None and not self.cache.matches(msg, a.record.commitments[sender][jj]):
            fault = "part does not match its commitment"
        return fault

    def _gradient_of(self, rnd: Round) -> Callable[[int, int], torch.Tensor]:
        """Recompute a peer's honest gradient (memoised within the step: in the simulator every local peer
        would recompute the same deterministic function)."""

        def get(peer: int, step: int) -> torch.Tensor:
            key = (peer, step)
            if key not in self._grad_memo:
                self._grad_memo[key] = rnd.honest_gradient(peer, None if step == rnd.step else step)
            return self._grad_memo[key]

        return get

    def _tick(self, phase: str, t0: float) -> None:
        self.timings[phase] += time.perf_counter() - t0


def _participants(rnd: Round) -> list[int]:
    return [p for p in rnd.active if not rnd.is_banned(p)]


def _is_list(msg) -> bool:
    return isinstance(msg, (list, tuple))


def _is_pair(entry) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) == 2


def _broadcast(rnd: Round, local: dict, peers: list[int], what: str, valid: Callable) -> Iterator[tuple]:
    """All-gather `local` among the participants and yield (peer, message) for each of `peers` (in order)
    whose message arrived and is `valid`; a missing one bans its sender as silent, an invalid one as
    malformed. Peers banned earlier are skipped."""
    got = rnd.comm.all_gather(local, _participants(rnd))
    for p in peers:
        if rnd.is_banned(p):
            continue
        msg = got.get(p)
        if msg is None:
            rnd.ban(p, f"silent: broadcast no {what}")
        elif not valid(msg):
            rnd.ban(p, f"malformed {what}")
        else:
            yield p, msg


DEFENSES.add(
    Entry(
        "btard",
        "BTARD-SGD: butterfly CenteredClip (defense.tau) with commitments, MPRNG, random-projection checks, "
        "disputes, validators (defense.validators) and bans",
        obj=BtardDefense,
        params=PARAMS,
        check=_check_config,
        preconditions="byzantine < (peers - validators)/2; validators < peers - 1; no defense.pre; tau >= 1e-20",
        variant="the full protocol (docs/protocol.md)",
        reference="Gorbunov, Borzunov, Diskin, Ryabinin 2022",
    )
)
