"""One BTARD-SGD step (DESIGN.md section 2), written SPMD-style over `comm.local_peers`.

Phase order (pitfall 8): validators from r_{t-1} -> gradients -> split + commit -> barrier -> scatter ->
commitment checks -> CenteredClip per partition -> all-gather -> MPRNG (r_t) -> random-projection check ->
validation of step t-1 and accusations -> ACCUSE resolution. The optimizer step with the returned update is
the trainer's; r_t is returned as `StepResult.shared_random` and seeds step t+1's minibatches and
validators.

Aggregation attempts: a ban during an attempt (a peer silent in a broadcast, a part that does not match
its commitment, a bad aggregate, an MPRNG fault of a gradient-sending peer, a lie in the check scalars, a
failed check) aborts the attempt and the aggregation restarts without the banned peers: new layout,
new commitments, new CenteredClip, new MPRNG, new check directions. Gradients are not recomputed (they are
a function of public data). The update applied is always one whose check passed with no ban in its
attempt. Each restart costs the attackers at least one peer, so a run has at most b restarts.

Bans from validation and from accusations (phase 8/9) do not restart the step: the current aggregate
passed its check and the banned peer's contribution to it is bounded by CenteredClip; the peer leaves
from the next step on (no rollback, as in the paper).

In the simulator every peer is local: the P partitions' CenteredClips run in one batched call, and a
decision that every peer takes from the same public data (a ban, a check verdict) is computed once.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from byztrain.aggregators import centered_clip_batched
from byztrain.config import Config, ConfigError
from byztrain.defenses import Defense, StepResult
from byztrain.protocol.bans import (
    Accusation,
    StepRecord,
    accusation_list_fault,
    audit,
    part_fault,
    resolve,
    rows_finite,
)
from byztrain.protocol.commitments import DigestCache, is_commitment_list
from byztrain.protocol.mprng import run_mprng
from byztrain.protocol.partition import Layout, layout_for
from byztrain.protocol.validators import choose_validators
from byztrain.protocol.verification import (
    clip_weights,
    draw_projections,
    is_scalar_message,
    partition_scalars,
    peer_scalars,
    projection_seed,
    scalars_agree,
)

if TYPE_CHECKING:
    from byztrain.runtime.round import Round

MEDIANS = ("lower", "upper", "average")

#: defense.params accepted by btard: name -> (description, default or None when derived)
PARAMS = {
    "check_rtol": "relative tolerance of the projected fixed-point check; default 10 * cclip_tol",
    "check_projections": "number q of random directions z per check (default 3)",
    "scalar_rtol": "relative tolerance when an aggregator re-derives s_ij, d_ij (default 1e-8)",
    "median": "CenteredClip start for even n: lower (default, as torch.median), upper or average",
}


def _params(config: Config) -> dict:
    d = config.defense
    p = dict(d.params or {})
    for key in p:
        if key not in PARAMS:
            raise ConfigError(
                f"defense.params.{key}", f"unknown parameter for btard; accepted: {', '.join(PARAMS)}"
            )

    def real(key, default):
        v = p.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"defense.params.{key}", f"must be a finite number > 0, got {v!r}")
        return float(v)

    q = p.get("check_projections", 3)
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise ConfigError("defense.params.check_projections", f"must be an integer >= 1, got {q!r}")
    median = p.get("median", "lower")
    if median not in MEDIANS:
        raise ConfigError("defense.params.median", f"must be one of {', '.join(MEDIANS)}, got {median!r}")
    if not math.isfinite(d.tau):
        raise ConfigError("defense.tau", f"btard needs a finite tau (the check weights use it), got {d.tau}")
    return {
        "check_rtol": real("check_rtol", 10.0 * d.cclip_tol),
        "check_projections": q,
        "scalar_rtol": real("scalar_rtol", 1e-8),
        "median": median,
    }


class BtardDefense(Defense):
    """BTARD-SGD: butterfly CenteredClip with commitments, MPRNG, random-projection checks, validators and
    ACCUSE-based bans. See the module docstring and docs/protocol.md."""

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
        self.check_rtol = p["check_rtol"]
        self.q = p["check_projections"]
        self.scalar_rtol = p["scalar_rtol"]
        self.median = p["median"]
        self.cache = DigestCache()
        self.record: StepRecord | None = None  # the previous step's final record (validators audit it)
        self.timings: dict[str, float] = defaultdict(float)  # seconds per phase, summed over steps
        self._grad_memo: dict[tuple[int, int], torch.Tensor] = {}

    # ---- helpers ---------------------------------------------------------------------------------
    def _tick(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[phase] += now - t0
        return now

    @staticmethod
    def _participants(rnd: Round) -> list[int]:
        return [p for p in rnd.active if not rnd.is_banned(p)]

    def _gradient_of(self, rnd: Round) -> Callable[[int, int], torch.Tensor]:
        """Recompute a peer's honest gradient (memoised within the step: in the simulator every local peer
        would recompute the same deterministic function)."""

        def get(peer: int, step: int) -> torch.Tensor:
            key = (peer, step)
            if key not in self._grad_memo:
                self._grad_memo[key] = rnd.honest_gradient(peer, None if step == rnd.step else step)
            return self._grad_memo[key]

        return get

    @staticmethod
    def _report(rnd: Round, peer: int, target: int, reason: str) -> bool:
        attack = rnd.attack(peer)
        return True if attack is None else bool(attack.on_report(target, reason, rnd.context(peer)))

    # ---- the step --------------------------------------------------------------------------------
    def step(self, rnd: Round) -> StepResult:
        t0 = time.perf_counter()
        self.cache.clear()
        self._grad_memo = {}
        local = set(rnd.comm.local_peers)
        prev = self.record
        if prev is not None and (rnd.previous is None or rnd.previous.step != prev.step):
            prev = None  # no parameters to recompute that step with
        pairs = choose_validators(
            rnd.shared_random, rnd.step, rnd.active, prev.layout.peers if prev else None, self.validators
        )
        sitting_out = {v for v, _ in pairs}
        workers0 = [p for p in rnd.active if p not in sitting_out]
        mine = [p for p in workers0 if p in local]
        grads = rnd.sent_gradients(mine, senders=workers0) if mine else None
        rows = {p: grads[i] for i, p in enumerate(mine)}
        t0 = self._tick("gradients", t0)

        outcome = None
        for attempt in range(len(workers0) + 1):
            workers = [p for p in workers0 if not rnd.is_banned(p)]
            if not workers:
                break
            before = len(rnd.banned_now)
            outcome = self._attempt(rnd, attempt, workers, rows)
            if outcome is not None:
                break
            if len(rnd.banned_now) == before:  # cannot happen: an aborted attempt always bans someone
                raise RuntimeError(f"btard step {rnd.step}: attempt {attempt} aborted without a ban")
            rnd.emit(
                "restart", reason=f"aggregation attempt {attempt} aborted by bans; rerunning without them"
            )
        if outcome is None:
            raise RuntimeError(f"btard step {rnd.step}: no aggregation attempt succeeded")
        record, shared_random, stats = outcome

        t0 = time.perf_counter()
        stats.update(self._validate_and_accuse(rnd, pairs, prev, record, local))
        self._tick("validate", t0)
        stats["btard_validators"] = len(pairs)
        stats["bans"] = len(rnd.banned_now)
        self.record = record
        self._grad_memo = {}
        update = record.layout.join(record.ghat)
        return StepResult(update=update, stats=stats, shared_random=shared_random)

    # ---- phases 2-7: one aggregation attempt -------------------------------------------------------
    def _attempt(self, rnd: Round, attempt: int, workers: list[int], rows: dict[int, torch.Tensor]):
        """Run commit -> scatter -> CenteredClip -> all-gather -> MPRNG -> check once. Returns
        (record, r_t, stats) or None when the attempt banned someone (the caller restarts)."""
        comm = rnd.comm
        local = set(comm.local_peers)
        device = rnd.workload.device
        step = rnd.step
        layout: Layout = layout_for(rnd.workload.dim, tuple(workers))
        P, k = layout.parts, layout.part_size
        record = StepRecord(step, attempt, layout, scalar_rtol=self.scalar_rtol)
        before = len(rnd.banned_now)

        def aborted() -> bool:
            return len(rnd.banned_now) > before

        # -- 2. split and commit; barrier --------------------------------------------------------
        t0 = time.perf_counter()
        my_parts = {p: layout.split(rows[p]) for p in workers if p in local}
        # every local sender's parts hashed in one batch (threads share the sha256 work)
        flat = self.cache.digest_many([part for parts in my_parts.values() for part in parts])
        commits = {p: flat[i * P : (i + 1) * P] for i, p in enumerate(my_parts)}
        got = comm.all_gather(commits, self._participants(rnd))
        for p in workers:
            c = got.get(p)
            if c is None:
                rnd.ban(p, "silent: broadcast no commitments")
            elif not is_commitment_list(c, P):
                rnd.ban(p, "malformed commitments")
            else:
                record.commitments[p] = [bytes(x) for x in c]
        if aborted():
            return None
        comm.barrier()
        t0 = self._tick("commit", t0)

        # -- 3. scatter part j -> aggregator j; receivers check parts against commitments ----------
        outgoing: dict[int, dict[int, torch.Tensor]] = {}
        for p, parts in my_parts.items():
            msg: dict | None = {layout.peers[j]: parts[j] for j in range(P)}
            attack = rnd.attack(p)
            if attack is not None:
                msg = attack.on_send_parts(msg, rnd.context(p))
            outgoing[p] = msg if isinstance(msg, dict) else {}
        incoming = comm.all_to_all(outgoing, workers)
        # Each local aggregator copies the parts it accepts straight into its row block of X (P_local, n, k),
        # the CenteredClip input; finiteness is checked once per block, not per part.
        aggs = [j for j in workers if j in local]
        n = len(workers)
        X = torch.empty(len(aggs), n, k, dtype=torch.float32, device=device)
        complaints: dict[int, list] = {}
        for a, j in enumerate(aggs):
            jj = layout.index(j)
            inbox = incoming.get(j, {})
            mine, accepted = [], []
            for r, i in enumerate(workers):
                msg = inbox.get(i)
                if msg is None:
                    mine.append((i, "missing", None))
                    continue
                fault = part_fault(msg, k, device, finite=False)
                if fault is None and not self.cache.matches(msg, record.commitments[i][jj]):
                    fault = "part does not match its commitment"
                if fault is not None:
                    mine.append((i, fault, msg))  # the signed message itself is the evidence
                else:
                    accepted.append((r, i, msg))
            if len(accepted) == n:
                torch.stack([m for _, _, m in accepted], out=X[a])  # one copy per partition
            else:
                for r, _, msg in accepted:
                    X[a, r].copy_(msg)
            finite = rows_finite(X[a])
            if not bool(finite.all()):
                for r, i, msg in accepted:
                    if not bool(finite[r]):
                        mine.append((i, "part has non-finite values", msg))
            complaints[j] = mine
        got = comm.all_gather(complaints, self._participants(rnd))
        resend: dict[int, list[int]] = defaultdict(list)  # sender -> receivers asking for a public copy
        for j, lst in _received_lists(rnd, got, workers, "complaint"):
            for entry in lst:
                if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and entry[0] in workers):
                    rnd.ban(j, "malformed complaint")
                    break
                i, why, evidence = entry
                if rnd.is_banned(i) or rnd.is_banned(j):
                    continue
                rnd.emit("complaint", peer=i, by=j, reason=str(why))
                if evidence is None:
                    resend[i].append(j)
                    continue
                fault = part_fault(evidence, k, device)
                if fault is None and not self.cache.matches(evidence, record.commitments[i][layout.index(j)]):
                    fault = "part does not match its commitment"
                if fault is not None:
                    rnd.ban(i, f"scattered part for {j}: {fault}", by=j)
                else:
                    rnd.ban(j, f"false complaint against {i}: the evidence matches its commitment", by=i)
        if resend:
            self._public_resend(rnd, layout, record, my_parts, resend, X, aggs)
        if aborted():
            return None
        t0 = self._tick("scatter", t0)

        # -- 4. CenteredClip on every local partition (batched) -----------------------------------
        values: torch.Tensor | None = None
        cstats: dict = {}
        if aggs:
            values, cstats = centered_clip_batched(
                X,
                self.tau,
                tol=self.cclip_tol,
                max_iters=self.cclip_max_iters,
                median=self.median,
            )
        t0 = self._tick("cclip", t0)

        # -- 5. all-gather the aggregated parts ----------------------------------------------------
        publish = {}
        for a, j in enumerate(aggs):
            v = values[a]
            attack = rnd.attack(j)
            if attack is not None:
                v = attack.on_aggregate(layout.index(j), v, rnd.context(j))
            if v is not None:
                publish[j] = v
        got = comm.all_gather(publish, self._participants(rnd))
        ghat = torch.zeros(P, k, dtype=torch.float32, device=device)
        for jj, j in enumerate(layout.peers):
            v = got.get(j)
            fault = "silent: published no aggregate" if v is None else part_fault(v, k, device, finite=False)
            if fault is not None:
                rnd.ban(j, f"aggregate of partition {jj}: {fault}" if v is not None else fault)
            else:
                ghat[jj] = v
        finite = rows_finite(ghat)
        for jj in torch.nonzero(~finite).flatten().tolist():
            if not rnd.is_banned(layout.peers[jj]):
                rnd.ban(layout.peers[jj], f"aggregate of partition {jj}: non-finite values")
        if aborted():
            return None
        record.ghat = ghat
        t0 = self._tick("allgather", t0)

        # -- 6. MPRNG: r_t, drawn only now that every aggregate is public ---------------------------
        def reveal(peer: int, secret: bytes):
            attack = rnd.attack(peer)
            return secret if attack is None else attack.on_mprng_reveal(secret, rnd.context(peer))

        res = run_mprng(
            comm,
            step,
            self._participants(rnd),
            secret=lambda peer, rd: rnd.mprng_secret(peer, rd, attempt),
            reveal=reveal,
            on_ban=lambda peer, why: rnd.ban(peer, why),
        )
        if res.rounds > 1:
            rnd.emit("mprng_rerun", reason=f"{res.rounds - 1} rerun(s) after bans", banned=sorted(res.banned))
        if any(p in workers for p in res.banned):
            return None  # a gradient sender left: its check scalars will never come; restart without it
        t0 = self._tick("mprng", t0)

        # -- 7. random-projection check -----------------------------------------------------------
        z = draw_projections(projection_seed(res.value, step, attempt), self.q, P, k, device)
        record.z = z
        z64 = z.to(torch.float64)
        # Aggregators derive (s_ij, d_ij) for every row of their partition. A row was accepted only after
        # its hash matched the sender's commitment to its own part, so it holds exactly the bytes the sender
        # computes its scalars from: a sender whose partition-j aggregator runs in this process takes the
        # numbers from there instead of recomputing them (with one peer per process: its own partition).
        derived: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for a, j in enumerate(aggs):
            jj = layout.index(j)
            derived[jj] = partition_scalars(X[a], ghat[jj], z64[:, jj])
        shared = sorted(derived)
        others = [jj for jj in range(P) if jj not in derived]
        if shared:
            S_loc = torch.stack([derived[jj][0] for jj in shared], dim=1)  # (n, |shared|, q)
            D_loc = torch.stack([derived[jj][1] for jj in shared], dim=1)  # (n, |shared|)
        scal = {}
        for p, parts in my_parts.items():
            r = workers.index(p)
            s = torch.empty(P, self.q, dtype=torch.float64, device=device)
            d = torch.empty(P, dtype=torch.float64, device=device)
            if shared:
                s[shared], d[shared] = S_loc[r], D_loc[r]
            if others:
                s[others], d[others] = peer_scalars(
                    torch.stack([parts[jj] for jj in others]), ghat[others], z64[:, others]
                )
            attack = rnd.attack(p)
            if attack is not None:
                s, d = attack.on_check_scalars(s, d, rnd.context(p))
            scal[p] = (s, d)
        got = comm.all_gather(scal, self._participants(rnd))
        for p in workers:
            msg = got.get(p)
            if msg is None:
                rnd.ban(p, "silent: broadcast no check scalars")
            elif not is_scalar_message(msg, P, self.q):
                rnd.ban(p, "malformed or non-finite check scalars")
            else:
                record.scalars[p] = (msg[0], msg[1])
        if aborted():
            return None
        S = torch.stack([record.scalars[i][0] for i in workers])  # (n, P, q)
        D = torch.stack([record.scalars[i][1] for i in workers])  # (n, P)
        z_norms = record.z_norms(z64)  # (P, q)

        # aggregators re-derive the scalars of their partition and accuse liars
        accuse = {}
        for j in aggs:
            jj = layout.index(j)
            s_re, d_re = derived[jj]
            ok = scalars_agree(S[:, jj], D[:, jj], s_re, d_re, z_norms[jj], self.scalar_rtol)
            lst = []
            for r in torch.nonzero(~ok).flatten().tolist():
                liar = workers[r]
                why = f"check scalars for partition {jj} differ from the part it sent"
                if self._report(rnd, j, liar, why):
                    lst.append((liar, why))
            accuse[j] = lst
        got = comm.all_gather(accuse, self._participants(rnd))
        explained: set[int] = set()
        gradient_of = self._gradient_of(rnd)
        for j in workers:
            lst = got.get(j)
            fault = "silent: broadcast no accusation list" if lst is None else accusation_list_fault(lst)
            if fault is not None:
                rnd.ban(j, fault)
                continue
            for accused, why in lst:
                if rnd.is_banned(j):
                    break
                if rnd.is_banned(accused) or accused not in rnd.active or accused == j:
                    continue
                rnd.emit("accuse", peer=accused, by=j, reason=str(why), accused_step=step)
                guilty, verdict, lied = resolve(
                    Accusation(j, accused, step, str(why)), {step: record}, gradient_of, self.cache
                )
                rnd.ban(guilty, verdict, by=j if guilty == accused else accused)
                explained.update(lied)  # partitions whose check a proven liar spoiled

        # everyone: the weighted sums, per partition and direction
        W = clip_weights(D, self.tau)  # (n, P)
        R = (W[..., None] * S).sum(dim=0)  # (P, q)
        mass = (W[..., None] * S.abs()).sum(dim=0)  # (P, q)
        ghat_norm = torch.linalg.vector_norm(ghat.to(torch.float64), dim=1)  # (P,)
        scale = n * (ghat_norm + self.tau)
        rel = (R.abs() / scale[:, None]).amax(dim=1)  # (P,)
        for jj, j in enumerate(layout.peers):
            if rel[jj] > self.check_rtol and jj not in explained:
                rnd.emit(
                    "check_failed",
                    peer=j,
                    reason=f"partition {jj}: |sum_i w_ij s_ij| = {rel[jj]:.3e} x n(||g_j||+tau) "
                    f"> check_rtol {self.check_rtol:.1e}, no liar proven",
                    partition=jj,
                    residual=float(rel[jj]),
                )
                rnd.ban(j, f"aggregation check failed for partition {jj}")
        self._tick("check", t0)
        if aborted():
            return None

        ratio = (R.abs() / mass.clamp_min(1e-300)).amax()
        stats = {
            "btard_workers": n,
            "attempts": attempt + 1,
            "mprng_rounds": res.rounds,
            "check_residual_max": float(rel.max()),
            "check_ratio_max": float(ratio),
        }
        if cstats:
            iters = cstats["iterations"].to(torch.float64)
            stats.update(
                cclip_iters_mean=float(iters.mean()),
                cclip_iters_max=int(cstats["iterations"].max()),
                cclip_clipped=int(cstats["clipped"].sum()),
                cclip_unconverged=int((~cstats["converged"]).sum()),
            )
        return record, res.value, stats

    def _public_resend(self, rnd, layout, record, my_parts, resend, X, aggs) -> None:
        """Parts a receiver says never arrived: the sender must broadcast them; silence or a mismatch
        bans it (now provable: everyone saw the broadcast or its absence)."""
        k = layout.part_size
        device = rnd.workload.device
        out = {}
        for i, receivers in resend.items():
            if i not in my_parts:
                continue
            msg: dict | None = {r: my_parts[i][layout.index(r)] for r in receivers}
            attack = rnd.attack(i)
            if attack is not None:
                msg = attack.on_send_parts(msg, rnd.context(i))
            if isinstance(msg, dict):
                out[i] = msg
        got = rnd.comm.all_gather(out, self._participants(rnd))
        for i in sorted(resend):
            if rnd.is_banned(i):
                continue
            msg = got.get(i)
            for r in resend[i]:
                part = msg.get(r) if isinstance(msg, dict) else None
                if part is None:
                    rnd.ban(i, f"silent: sent no part to {r}, not even when asked publicly", by=r)
                    break
                fault = part_fault(part, k, device)
                if fault is None and not self.cache.matches(part, record.commitments[i][layout.index(r)]):
                    fault = "part does not match its commitment"
                if fault is not None:
                    rnd.ban(i, f"publicly resent part for {r}: {fault}", by=r)
                    break
                if r in aggs:
                    X[aggs.index(r), layout.index(i)].copy_(part)

    # ---- phases 8-9: validators and accusations --------------------------------------------------
    def _validate_and_accuse(self, rnd, pairs, prev, record, local) -> dict:
        step = rnd.step
        gradient_of = self._gradient_of(rnd)
        records = {step: record}
        if prev is not None:
            records[prev.step] = prev
        out: dict[int, list] = {}
        for p in self._participants(rnd):
            if p in local:
                out[p] = []
        for v, target in pairs:
            if v not in local or target is None or rnd.is_banned(v) or rnd.is_banned(target):
                continue
            guilt, _ = audit(prev, target, gradient_of(target, prev.step), self.cache)
            if guilt is not None and self._report(rnd, v, target, guilt):
                out[v].append((target, f"validation: {guilt}", prev.step))
        for p in list(out):
            attack = rnd.attack(p)
            if attack is None:
                continue
            for entry in attack.accusations(rnd.context(p)) or []:
                target, why = entry
                out[p].append((target, str(why), step))
        got = rnd.comm.all_gather(out, self._participants(rnd))
        n_acc = 0
        for p, lst in _received_lists(rnd, got, self._participants(rnd), "accusation"):
            for entry in lst:
                if rnd.is_banned(p):
                    break
                ok = isinstance(entry, (list, tuple)) and len(entry) == 3
                ok = (
                    ok
                    and isinstance(entry[0], int)
                    and not isinstance(entry[0], bool)
                    and entry[2] in records
                )
                if not ok:
                    rnd.ban(p, "malformed accusation")
                    break
                accused, why, acc_step = entry
                if accused == p or accused not in rnd.active or rnd.is_banned(accused):
                    continue
                n_acc += 1
                rnd.emit("accuse", peer=accused, by=p, reason=str(why), accused_step=acc_step)
                guilty, verdict, _ = resolve(
                    Accusation(p, accused, acc_step, str(why)), records, gradient_of, self.cache
                )
                rnd.ban(guilty, verdict, by=p if guilty == accused else accused)
        return {
            "validator_pairs": sum(1 for _, t in pairs if t is not None),
            "accusations": n_acc,
        }


def _received_lists(rnd: Round, got: dict, peers, what: str):
    """(peer, list) for each peer whose `what` list broadcast arrived as a list or tuple, in `peers` order.
    A peer whose list is missing is banned as silent, one that sent something else as malformed."""
    for p in peers:
        lst = got.get(p)
        if lst is None:
            rnd.ban(p, f"silent: broadcast no {what} list")
        elif not isinstance(lst, (list, tuple)):
            rnd.ban(p, f"malformed {what} list")
        else:
            yield p, lst
