"""A Collective over torch.distributed point-to-point messages (gloo), one peer per process.

Why point-to-point and not gloo's collectives: a gloo collective (all_gather, barrier, ...) involves every
rank of the group, and once one rank dies the whole group errors out; worse, a gloo *timeout* closes every
connection of the rank that timed out ("Application timeout caused pair closure"). Measured on torch 2.13:
after `kill -9` of one rank, `isend`/`irecv` between the surviving ranks keep working and any operation
that involves the dead rank fails at once ("Connection closed by peer" / "Read error"). So every message
here is an `isend`/`irecv` pair on the default gloo group, and a sender that is missing is reported as an
absent entry in the returned dict, which the protocol treats as silence (BTARD bans the peer).

Timeouts without gloo timeouts: gloo's `Work.wait(timeout)` would close the rank's connections when it
fires, and gloo's p2p works support neither `is_completed()` polling nor futures. Each pending operation is
therefore waited on, with an explicit practically infinite timeout (NO_TIMEOUT: it overrides the process
group's, which only bounds connecting at start-up), by a small daemon thread per (peer, direction); the
calling thread waits on those with its own deadline
(`runtime.timeout_s` for every round of a collective). A peer that misses the deadline is declared dead:
its pending operations are abandoned (kept referenced so their buffers stay valid) and it is never waited
on again. Behaviour by fault:

- crash (`kill -9`, segfault, OOM-kill) of a peer: detected within milliseconds (the socket closes); the
  peer is absent from the collective it died in and from all later ones;
- hang (alive but silent, e.g. SIGSTOP, a deadlock, a partition): absent after `runtime.timeout_s`;
- a Byzantine peer that chooses to send nothing sends an explicit "nothing" header: absent at once, no
  timeout (same semantics as the in-process Collective).

Consistency of all-gathers: a peer killed in the middle of an all-gather may have reached some receivers and
not others. After the data round every member therefore runs AGREEMENT_ROUNDS rounds of tiny messages: it
sends the bitmask of the senders it still keeps and intersects its set with every mask it receives (a
missing mask is not intersected, never counted as a missing sender). All surviving members return the same
dict as long as one of those rounds sees no crash, so 3 rounds tolerate any two peers dying during one
all-gather (FloodSet-style consensus under crash faults; see `_agree`). With a single round, two peers
killed together once left survivors with different views. Each mask is one fixed-size message per pair (no
length header). This agreement step trusts the transport code, which is the same honest code in every
process: Byzantine behaviour is modelled at the protocol level (attack hooks), not by forged masks or by
sending different messages to different receivers (equivocation). BTARD assumes a broadcast channel; a
deployment against a transport-level adversary needs a Byzantine reliable broadcast (echo + signatures) in
place of this round.

All-to-all is point-to-point by nature: each receiver gets what reached it (no agreement round); BTARD's
complaint / public-resend phase deals with parts that did not arrive.

Wire format: one int64 header per (sender, receiver) (payload length, or -1 for "nothing"), then the
payload as one uint8 tensor: a pickled skeleton of plain data (dict, list, tuple, set, str, bytes, int,
float, bool, None) whose tensors are referenced by (offset, dtype, shape) into the raw bytes that follow.
Receivers unpickle with an unpickler that resolves no globals at all, so a Byzantine sender cannot make a
receiver run code. Byte accounting counts what is written: payload + 8-byte headers + masks.

GPU: tensors are staged through host memory and moved to `device` on receipt. NCCL is not used for the
messages: NCCL p2p cannot report a missing peer (a dead peer hangs or aborts the communicator), which
would defeat the fault semantics above; the step's compute stays on the GPU.
"""

from __future__ import annotations

import io
import pickle
import queue
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from byztrain.comm.base import Collective, PeerExcluded

#: Mask rounds after each all-gather's data round. The survivors agree unless a crash hits every round, so
#: f + 1 rounds tolerate any f peers dying during one all-gather (as FloodSet consensus): 3 rounds, any two.
AGREEMENT_ROUNDS = 3

#: What the waiter threads pass to gloo's wait(): effectively none (see the module docstring).
NO_TIMEOUT = timedelta(days=365)

_DTYPES = {
    str(t): t
    for t in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}
_ALIGN = 8


class MessageError(ValueError):
    """A message that cannot be encoded (sender side) or decoded (receiver side)."""


# ---- encoding ------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """Reduce a message to plain data + tensors (raises MessageError for anything else)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, torch.Size):
        return tuple(obj)
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_plain(v) for v in obj)
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalars
        return obj.item()
    raise MessageError(f"cannot send a {type(obj).__name__} (messages are plain data and tensors)")


def encode(obj: Any) -> torch.Tensor:
    """A message as one uint8 tensor: [skeleton length][pickled skeleton][tensor bytes, 8-aligned]."""
    tensors: list[torch.Tensor] = []
    offset = 0

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o):
            nonlocal offset
            if isinstance(o, torch.Tensor):
                t = o.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                t = t.contiguous()
                if str(t.dtype) not in _DTYPES:
                    raise MessageError(f"cannot send a tensor of dtype {t.dtype}")
                pid = (offset, str(t.dtype), tuple(t.shape))
                tensors.append(t)
                offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
                return pid
            return None

    f = io.BytesIO()
    _Pickler(f, protocol=5).dump(_plain(obj))
    skeleton = f.getvalue()
    head = 8 + len(skeleton)
    start = -(-head // _ALIGN) * _ALIGN
    buf = torch.empty(start + offset, dtype=torch.uint8)
    buf[:8] = torch.tensor([len(skeleton)], dtype=torch.int64).view(torch.uint8)
    buf[8:head] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
    pos = start
    for t in tensors:
        n = t.numel() * t.element_size()
        if n:
            buf[pos : pos + n] = t.reshape(-1).view(torch.uint8)
        pos += -(-n // _ALIGN) * _ALIGN
    return buf


def decode(buf: torch.Tensor, device: torch.device | None = None) -> Any:
    """Inverse of `encode`; tensors are views into `buf` (moved to `device` when it is not the CPU)."""
    total = buf.numel()
    if total < 8:
        raise MessageError("message shorter than its header")
    n = int(buf[:8].view(torch.int64).item())
    if n < 0 or 8 + n > total:
        raise MessageError("bad skeleton length")
    start = -(-(8 + n) // _ALIGN) * _ALIGN
    skeleton = bytes(buf[8 : 8 + n].numpy())

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):  # no globals: plain data only
            raise MessageError(f"message refers to {module}.{name}")

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) == 3):
                raise MessageError("bad tensor reference")
            off, dtype_name, shape = pid
            dtype = _DTYPES.get(dtype_name)
            if (
                dtype is None
                or not isinstance(off, int)
                or off < 0
                or off % _ALIGN
                or not isinstance(shape, tuple)
                or not all(isinstance(s, int) and s >= 0 for s in shape)
            ):
                raise MessageError("bad tensor reference")
            numel = 1
            for s in shape:
                numel *= s
            size = numel * torch.empty((), dtype=dtype).element_size()
            lo = start + off
            if lo + size > total:
                raise MessageError("tensor reference out of bounds")
            t = buf[lo : lo + size].view(dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)
            return t.to(device) if device is not None and device.type != "cpu" else t

    try:
        return _Unpickler(io.BytesIO(skeleton)).load()
    except MessageError:
        raise
    except Exception as exc:  # truncated / garbage pickle
        raise MessageError(f"undecodable message: {type(exc).__name__}: {exc}") from None


# ---- waiting on gloo works with a deadline --------------------------------------------------------


class _Slot:
    __slots__ = ("event", "error", "work", "tensor", "peer")

    def __init__(self, work, tensor, peer):
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.work = work
        self.tensor = tensor  # keeps the buffer alive while gloo may still write/read it
        self.peer = peer


class _Waiter(threading.Thread):
    """Waits, in order, on the works of one (peer, direction) and signals each slot when it is done."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.start()

    def run(self) -> None:
        while True:
            slot = self.q.get()
            if slot is None:
                return
            try:
                slot.work.wait(NO_TIMEOUT)
            except BaseException as exc:  # noqa: BLE001 - reported to the waiting thread
                slot.error = exc
            slot.work = None
            slot.event.set()


class TorchCollective(Collective):
    """One peer per process; peer id == rank of the default process group (gloo)."""

    def __init__(self, rank: int, world_size: int, *, timeout_s: float, device: str | torch.device = "cpu"):
        super().__init__([rank])
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.device = torch.device(device)
        self.dead: dict[int, str] = {}  # rank -> why it is considered gone (crashed / timed out)
        self.members: list[int] = list(range(world_size))  # barrier() waits for these
        self.log: list[dict] = []  # transport events (a peer declared dead), drained by the runtime
        self._seq = 0  # collectives called (for messages)
        self._pair_seq: dict[int, int] = {}
        self._recv_waiters: dict[int, _Waiter] = {}
        self._send_waiters: dict[int, _Waiter] = {}
        self._pending_sends: list[_Slot] = []
        self._abandoned: list[_Slot] = []
        self._lock = threading.Lock()

    # ---- plumbing -----------------------------------------------------------------------------------
    def _pair_tag(self, peer: int) -> int:
        """Tag of the next exchange with `peer`. Counted per pair, not per collective: a process that takes
        no part in a collective (a BTARD validator in the scatter) exchanges nothing with anyone in it, so
        both ends of every pair still agree on the count."""
        n = self._pair_seq.get(peer, 0) + 1
        self._pair_seq[peer] = n
        return (n * 2) % (2**31 - 4)

    def _declare_dead(self, peer: int, why: str) -> None:
        if peer not in self.dead:
            self.dead[peer] = why
            self.log.append({"type": "peer_lost", "peer": peer, "reason": why, "collective": self._seq})

    def _waiter(self, table: dict[int, _Waiter], peer: int, kind: str) -> _Waiter:
        w = table.get(peer)
        if w is None:
            w = table[peer] = _Waiter(f"byztrain-{kind}-{peer}")
        return w

    def _send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        try:
            work = dist.isend(tensor, peer, tag=tag)
        except RuntimeError as exc:
            self._declare_dead(peer, f"send failed: {_short(exc)}")
            return
        slot = _Slot(work, tensor, peer)
        self._waiter(self._send_waiters, peer, "send").q.put(slot)
        self._pending_sends.append(slot)
        if self.accounting:
            self.sent_bytes[self.rank] += tensor.numel() * tensor.element_size()

    def _recv(self, tensor: torch.Tensor, peer: int, tag: int) -> _Slot | None:
        try:
            work = dist.irecv(tensor, peer, tag=tag)
        except RuntimeError as exc:
            self._declare_dead(peer, f"receive failed: {_short(exc)}")
            return None
        slot = _Slot(work, tensor, peer)
        self._waiter(self._recv_waiters, peer, "recv").q.put(slot)
        return slot

    def _await(self, slots: dict[int, _Slot | None], deadline: float) -> dict[int, torch.Tensor]:
        """Wait for the receives in `slots` until `deadline`; peers that fail or miss it are declared dead."""
        done: dict[int, torch.Tensor] = {}
        for peer, slot in slots.items():
            if slot is None:
                continue
            if not slot.event.wait(max(deadline - time.monotonic(), 0.0)):
                self._abandoned.append(slot)
                self._declare_dead(peer, f"no message within runtime.timeout_s = {self.timeout_s:g} s")
                continue
            if slot.error is not None:
                self._declare_dead(peer, f"receive failed: {_short(slot.error)}")
                continue
            done[peer] = slot.tensor
            if self.accounting:
                self.received_bytes[self.rank] += slot.tensor.numel() * slot.tensor.element_size()
        self._reap_sends()
        return done

    def _reap_sends(self) -> None:
        still = []
        for slot in self._pending_sends:
            if not slot.event.is_set():
                still.append(slot)
        self._pending_sends = still

    def _exchange(self, outgoing: dict[int, torch.Tensor | None], sources: list[int]) -> dict[int, torch.Tensor | None]:
        """Send `outgoing[q]` (None: an explicit "nothing") to each q, receive one message from each source.
        Returns source -> payload (None when it sent "nothing"); missing sources are left out."""
        tags = {q: self._pair_tag(q) for q in dict.fromkeys([*outgoing, *sources])}
        for q, payload in outgoing.items():
            n = -1 if payload is None else payload.numel()
            self._send(torch.tensor([n], dtype=torch.int64), q, tags[q])
            if payload is not None and n > 0:
                self._send(payload, q, tags[q] + 1)
        heads = {q: self._recv(torch.empty(1, dtype=torch.int64), q, tags[q]) for q in sources}
        got_heads = self._await(heads, time.monotonic() + self.timeout_s)
        bodies: dict[int, _Slot | None] = {}
        out: dict[int, torch.Tensor | None] = {}
        for q, head in got_heads.items():
            n = int(head.item())
            if n < 0:
                out[q] = None
            elif n == 0:
                out[q] = torch.empty(0, dtype=torch.uint8)
            else:
                bodies[q] = self._recv(torch.empty(n, dtype=torch.uint8), q, tags[q] + 1)
        # a sender whose header arrived is alive and its payload is on the way: a fresh deadline
        out.update(self._await(bodies, time.monotonic() + self.timeout_s))
        return out

    def _exchange_fixed(self, payload: torch.Tensor, peers: list[int]) -> dict[int, torch.Tensor]:
        """Send `payload` to each of `peers` and receive one tensor of the same shape and dtype from each:
        one message per pair, no length header (so one network hop instead of two). Missing peers are left
        out."""
        tags = {q: self._pair_tag(q) for q in peers}
        for q in peers:
            self._send(payload, q, tags[q])
        slots = {q: self._recv(torch.empty_like(payload), q, tags[q]) for q in peers}
        return self._await(slots, time.monotonic() + self.timeout_s)

    def _alive(self, peers) -> list[int]:
        return [q for q in peers if q != self.rank and q not in self.dead]

    def _decode(self, sender: int, payload: torch.Tensor) -> tuple[bool, Any]:
        try:
            return True, decode(payload, self.device)
        except MessageError as exc:
            self.log.append({"type": "bad_message", "peer": sender, "reason": str(exc), "collective": self._seq})
            return False, None

    # ---- the Collective interface -------------------------------------------------------------------
    def all_gather(self, local: dict[int, Any], peers: list[int]) -> dict[int, Any]:
        me = self.rank
        peers = list(dict.fromkeys(peers))
        if me not in peers:
            raise PeerExcluded(f"peer {me} is not among the participants {peers}")
        self._seq += 1
        self.members = [p for p in self.members if p in peers]
        others = self._alive(peers)
        payload = encode(local[me]) if me in local else None
        got = self._exchange({q: payload for q in others}, others)
        received: dict[int, Any] = {}
        if me in local:
            received[me] = local[me]
        for q, body in got.items():
            if body is not None:
                ok, value = self._decode(q, body)
                if ok:
                    received[q] = value
        keep = self._agree(set(received), peers)
        return {p: received[p] for p in peers if p in keep}

    def _agree(self, keep: set[int], peers: list[int]) -> set[int]:
        """The senders every surviving member received: AGREEMENT_ROUNDS rounds in which each member sends
        its current set (a bitmask) and intersects it with every set it receives (see the module docstring).

        A member that dies mid-round reaches some members and not others, so one round can leave survivors
        with different sets (the cause of a double-kill failure: one survivor kept a peer that another
        banned as silent, their layouts then differed and an honest peer's commitments looked malformed).
        After any round in which nobody dies, every survivor holds the intersection of all survivors' sets,
        and later rounds keep it (a set from a member that dies later equals that intersection too). A
        missing set is therefore simply not intersected: dropping its sender's data would make survivors
        that did receive the set disagree again. So the result agrees unless every round has a crash."""
        for _ in range(AGREEMENT_ROUNDS):
            mask = torch.zeros(self.world_size, dtype=torch.uint8)
            for q in keep:
                mask[q] = 1
            others = self._alive(peers)
            masks = self._exchange_fixed(mask, others)
            for q in others:
                m = masks.get(q)
                if m is None:
                    continue  # died (or hung) in this round: see the docstring
                keep &= {p for p in range(self.world_size) if m[p]}
        return keep

    def all_to_all(self, outgoing: dict[int, dict[int, Any]], peers: list[int]) -> dict[int, dict[int, Any]]:
        me = self.rank
        peers = list(dict.fromkeys(peers))
        if me not in peers:
            return {}
        self._seq += 1
        mine = outgoing.get(me) or {}
        others = self._alive(peers)
        send = {q: (encode(mine[q]) if q in mine else None) for q in others}
        got = self._exchange(send, others)
        inbox: dict[int, Any] = {}
        if me in mine:
            inbox[me] = mine[me]
        for q in peers:
            body = got.get(q)
            if body is not None:
                ok, value = self._decode(q, body)
                if ok:
                    inbox[q] = value
        return {me: inbox}

    def barrier(self) -> None:
        self._seq += 1
        others = self._alive(self.members)
        self._exchange({q: None for q in others}, others)

    def gather_to(self, root: int, obj: Any, peers: list[int]) -> dict[int, Any] | None:
        """Every member of `peers` sends `obj` to `root` only (telemetry); returns the dict on `root`."""
        me = self.rank
        if me not in peers:
            raise PeerExcluded(f"peer {me} is not among the participants {peers}")
        self._seq += 1
        if me != root:
            if root not in self.dead:
                self._exchange({root: encode(obj)}, [])
            return None
        others = self._alive(peers)
        got = self._exchange({}, others)
        out = {me: obj}
        for q, body in got.items():
            if body is not None:
                ok, value = self._decode(q, body)
                if ok:
                    out[q] = value
        return out

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until this process's sends were taken by their receivers (before exiting)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        for slot in self._pending_sends:
            if slot.peer in self.dead:
                continue
            if not slot.event.wait(max(deadline - time.monotonic(), 0.0)):
                return False
        self._pending_sends = []
        return True

    def close(self) -> None:
        """End of this process's part in the run (after `flush`): make gloo give up on the operations that
        will never complete (receives abandoned on a dead or hung peer, sends it never took), so that no
        thread is left blocked inside gloo when the interpreter exits -- that aborts the process
        ("terminate called without an active exception", SIGABRT), which torchrun reports as a failure.
        A gloo wait that times out closes every connection of this process; that is what ends the stuck
        waits, and it is harmless now that this process has nothing more to send or receive."""
        stuck = [s for s in [*self._abandoned, *self._pending_sends] if not s.event.is_set()]
        for slot in stuck:
            work = slot.work
            if work is None or slot.event.is_set():
                continue
            try:
                work.wait(timedelta(milliseconds=1))
            except Exception:  # noqa: BLE001 - the timeout (or an already broken pair) is the point
                pass
        for slot in stuck:
            slot.event.wait(5.0)
        for table in (self._recv_waiters, self._send_waiters):
            for w in table.values():
                w.q.put(None)
            for w in table.values():
                w.join(1.0)
            table.clear()

    def take_log(self) -> list[dict]:
        out, self.log = self.log, []
        return out


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."
