"""Distributed runtime: one process per peer on torch.distributed (gloo), on one host or many.

`run_distributed(config)` either
- spawns `config.peers` local processes (one thread each, 127.0.0.1, a TCPStore hosted by this parent
  process, which therefore outlives any peer), or
- when started by `torchrun` (env RANK / WORLD_SIZE set), joins as that rank through env:// (multi-host).

Every process builds the same Trainer with a `TorchCollective` hosting its one peer (peer id == rank) and
runs the same step code as the simulator; Byzantine peers are real processes running the attack hooks.
Rank 0 (peer 0, always honest: `choose_byzantine` never draws it) evaluates and writes the run folder with
the simulator's contract: at every logging step it gathers the other ranks' losses, byte counts and any
events it did not itself record (tagged with `rank`), so metrics.jsonl has the same fields and
events.jsonl the same events; summary.json is written by rank 0 at the end.

Faults (docs/distributed.md has the full table):
- a peer process other than rank 0 crashes or hangs: it is absent from the collectives (at once for a
  crash, after runtime.timeout_s for a hang), the protocol bans it as silent (BTARD; the baselines ban a
  peer whose gradient does not arrive) and the run goes on without it;
- rank 0 (the writer) dies, or at least half of a step's peers vanish at once (no quorum: this process may
  be the one cut off): the run stops. Local launch: the parent stops every process and raises
  `DistributedRunError` naming the last checkpoint; `byztrain run --resume` continues from it. Under
  torchrun the agent stops the group; with `--max-restarts N` it restarts it and the run resumes by itself
  (TORCHELASTIC_RESTART_COUNT > 0 implies --resume);
- a banned peer's process stops (exit code 0): nobody talks to it any more;
- the honest majority is lost (runtime/majority.py): every process sees it at the same step (it is a
  function of the common state), the writer flushes the metrics and keeps a checkpoint, every process still
  in the run exits with EXIT_MAJORITY_LOST and `run_distributed` raises `HonestMajorityLost` with the
  reason. A resume stops again at once: the run cannot go on.

MPRNG keys (runtime/keyfile.py): the local launcher creates the run folder's `mprng.key` before spawning
and every rank reads it, so a run replays exactly, matches the simulator given the same key file, and
resumes bit for bit. Under torchrun a rank reads the run folder's key file if its host has one (copy the
same file to every host for a reproducible run); otherwise it draws its own key from os.urandom, as a
deployment peer would: the run is then not reproducible, and a resumed run continues with fresh keys.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from byztrain.comm import PeerExcluded
from byztrain.comm.torch_dist import TorchCollective
from byztrain.config import Config, ConfigError
from byztrain.protocol.mprng import KEY_BYTES
from byztrain.runtime import checkpoint as ckpt
from byztrain.runtime.keyfile import ensure_key, read_key
from byztrain.runtime.majority import HonestMajorityLost
from byztrain.runtime.outputs import RunWriter
from byztrain.runtime.trainer import Trainer

WRITER = 0
EXIT_STOPPED = 75  # the run stopped cleanly (writer lost / no quorum); resume from the checkpoint
EXIT_MAJORITY_LOST = 76  # the run stopped for good: the honest majority is lost (runtime/majority.py)
#: test / chaos hook: "RANK@STEP[,RANK@STEP...]" -> that rank SIGKILLs itself right after finishing STEP
#: (in a run that started fresh, not in a resumed one, so a restarted group does not kill itself again)
FAULT_ENV = "BYZTRAIN_FAULT_KILL"
#: debugging: print every event of every rank to stderr as it happens (diverging views show at once)
DEBUG_ENV = "BYZTRAIN_DEBUG_EVENTS"


class DistributedRunError(RuntimeError):
    """The distributed run stopped before the end; the message says why and how to resume."""


class _Stop(Exception):
    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


class DistributedTrainer(Trainer):
    """A Trainer hosting one peer; only the telemetry and checkpoint plumbing differ (see Trainer)."""

    def __init__(
        self,
        config: Config,
        comm: TorchCollective,
        writer: RunWriter | None,
        progress: bool,
        secret_key: bytes | None = None,
    ):
        super().__init__(config, comm=comm, writer=writer, progress=progress, secret_key=secret_key)
        self.rank = comm.rank
        self.evaluates = self.rank == WRITER
        self.final_checkpoint = True  # the final parameters are only in the checkpoint
        self._own_events: list[dict] = []  # writer: its events since the last sync (to de-duplicate)
        self._buffer: list[dict] = []  # others: events not yet shipped to the writer

    def _emit(self, type: str, peer: int | None = None, by: int | None = None, reason: str = "", **extra) -> None:
        rec = {"step": self.step, "type": type, "peer": peer, "by": by, "reason": reason, **extra}
        if os.environ.get(DEBUG_ENV):
            print(f"[rank {self.rank}] {rec}", file=sys.stderr, flush=True)
        if self.writer is not None:
            self.writer.event(rec)
            self._own_events.append(rec)
        else:
            self._buffer.append(rec)

    def _after_step(self) -> None:
        for e in self.comm.take_log():
            if self.rank == WRITER:  # the writer's view of the transport; other ranks' would repeat it
                self._emit(e["type"], peer=e["peer"], reason=e["reason"], by=None)
        if self.rank not in self.active:
            raise _Stop(0, f"peer {self.rank} was banned at step {self.banned.get(self.rank)}; its process stops")
        if WRITER not in self.active:
            raise _Stop(EXIT_STOPPED, f"the writer (peer {WRITER}) left the run at step {self.step}")
        before = self._traffic.get(self.step, {}).get("active", self.active)
        if len(before) > 2 and 2 * (len(before) - len(self.active)) >= len(before):
            raise _Stop(
                EXIT_STOPPED,
                f"{len(before) - len(self.active)} of {len(before)} peers vanished at step {self.step}: no quorum",
            )

    def _sync(self) -> None:
        payload = None
        if self.rank != WRITER:
            payload = {"losses": self._losses, "traffic": self._traffic, "events": self._buffer}
            self._losses, self._traffic, self._buffer = {}, {}, []
        with self.comm.unaccounted():
            got = self.comm.gather_to(WRITER, payload, list(self.active))
        if got is None:
            return
        own: dict[str, int] = {}
        for e in self._own_events:
            key = json.dumps(e, sort_keys=True, default=str)
            own[key] = own.get(key, 0) + 1
        self._own_events = []
        for r, msg in sorted(got.items()):
            if r == WRITER or not isinstance(msg, dict):
                continue
            for step, losses in (msg.get("losses") or {}).items():
                if isinstance(losses, dict) and step in self._losses:
                    self._losses[step].update({p: v for p, v in losses.items() if p == r})
            for step, t in (msg.get("traffic") or {}).items():
                if isinstance(t, dict) and step in self._traffic:
                    for key in ("sent", "received"):
                        self._traffic[step][key].update({p: v for p, v in (t.get(key) or {}).items() if p == r})
            unmatched = dict(own)  # each rank's events are matched against the writer's own, separately
            for e in msg.get("events") or []:
                key = json.dumps(e, sort_keys=True, default=str)
                if unmatched.get(key, 0) > 0:
                    unmatched[key] -= 1  # the writer recorded the same event itself
                elif isinstance(e, dict) and self.writer is not None:
                    self.writer.event({**e, "rank": r})

    def save_checkpoint(self, elapsed: float) -> None:
        blobs = self.peer_states()
        with self.comm.unaccounted():
            got = self.comm.gather_to(WRITER, blobs, list(self.active))
        if got is None or self.writer is None:
            return
        own = {}
        for r, d in got.items():
            if isinstance(d, dict) and isinstance(d.get(r), bytes):
                own[r] = d[r]  # a process ships only its own peer's state
        ckpt.write(self.writer.dir, self.config, self.step, ckpt.to_bytes(self.state_dict(elapsed)), own)

    def load_state(self, state: dict, own: dict[int, bytes]) -> None:
        super().load_state(state, own)
        if self.rank != WRITER:  # the writer's telemetry of the partial window stays with the writer
            self._window, self._losses, self._traffic = [], {}, {}
        self.comm.members = list(self.active)


# ---- one rank ----------------------------------------------------------------------------------------


def _fault_step(rank: int) -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    for item in spec.split(","):
        if "@" in item:
            r, s = item.split("@", 1)
            if int(r) == rank:
                return int(s)
    return None


def _start_state(comm: TorchCollective, config: Config, resume: bool):
    """Rank 0 decides how the run starts (fresh / from a checkpoint / already finished / abort) and sends
    each rank what it needs: the common state and that rank's own peer state. Only rank 0 reads files."""
    world = comm.world_size
    outgoing = {}
    error = None
    info = finished = None
    if comm.rank == WRITER:
        plan: dict = {"kind": "fresh"}
        common = b""
        own: dict[int, bytes] = {}
        if resume:
            try:
                info, finished = ckpt.prepare_resume(config, config.out_dir)
            except ConfigError as exc:
                error = exc
        if error is not None:
            plan = {"kind": "abort", "reason": str(error)}
        elif finished is not None:
            plan = {"kind": "finished", "summary": finished}
        elif info is not None:
            try:
                common, own = ckpt.read(info)
                plan = {"kind": "resume", "step": int(info["step"])}
            except OSError as exc:
                error = ConfigError("<resume>", f"cannot read the checkpoint {info['path']}: {exc}")
                plan = {"kind": "abort", "reason": str(error)}
        elif not resume:
            ckpt.clear(config.out_dir)
        outgoing = {WRITER: {r: {**plan, "common": common, "own": own.get(r)} for r in range(world)}}
    with comm.unaccounted():
        got = comm.all_to_all(outgoing, list(range(world)))
    msg = got.get(comm.rank, {}).get(WRITER)
    if error is not None:
        raise error
    if not isinstance(msg, dict):
        raise _Stop(EXIT_STOPPED, "no start message from rank 0")
    return msg, info


def _rank_key(config: Config, launched: bool) -> bytes:
    """This rank's MPRNG master key: the run folder's key file; under torchrun, where this host may have
    none, a fresh os.urandom key of its own (only its own peer's key is derived from it)."""
    key = read_key(config.out_dir)
    if key is not None:
        return key
    if not launched:
        raise RuntimeError(f"the launcher created no MPRNG key file in {config.out_dir}")
    return os.urandom(KEY_BYTES)


def _connect_timeout(config: Config) -> timedelta:
    """Start-up (importing torch and loading data in every process, then the rendezvous) can take minutes
    on a loaded machine: at least 5 minutes, or runtime.timeout_s if longer."""
    return timedelta(seconds=max(config.runtime.timeout_s, 300))


def _rank_main(config: Config, rank: int, world: int, store, progress: bool, resume: bool) -> tuple[int, dict | None]:
    """Run one rank to the end. Returns (exit code, summary or None)."""
    if config.runtime.device.startswith("cuda") and torch.cuda.is_available() and ":" not in config.runtime.device:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    # The process-group timeout bounds start-up (the rendezvous, connecting the mesh) only: the Collective
    # waits with its own deadline (runtime.timeout_s) and passes gloo an explicit NO_TIMEOUT.
    connect = _connect_timeout(config)
    launched = store is None
    if launched:  # torchrun / env://
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
        base = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=rank == 0 and not agent,
            timeout=connect,
        )
        # A restarted group (torchrun --max-restarts) may find the first attempt's keys (the peers' old
        # addresses) in the same store: one key space per attempt.
        store = dist.PrefixStore(f"byztrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=connect)
    comm = TorchCollective(rank, world, timeout_s=config.runtime.timeout_s, device=config.runtime.device)
    msg, info = _start_state(comm, config, resume)
    if msg["kind"] == "abort":
        raise ConfigError("<resume>", msg.get("reason", "rank 0 refused to resume"))
    if msg["kind"] == "finished":
        return 0, msg["summary"]
    writer = None
    if rank == WRITER:
        writer = RunWriter(config, config.out_dir, resume=msg["kind"] == "resume")
    code, summary = 0, None
    try:
        key = _rank_key(config, launched=launched)
        trainer = DistributedTrainer(config, comm, writer, progress and rank == WRITER, secret_key=key)
        if msg["kind"] == "resume":
            trainer.load_state(ckpt.from_bytes(msg["common"]), {rank: msg["own"]} if msg["own"] else {})
            if writer is not None:
                writer.event(ckpt.resume_event(info, "distributed"))
        comm.take_byte_counts()
        if rank not in trainer.active:
            return 0, None  # banned before the checkpoint: nothing to do
        kill_at = _fault_step(rank) if msg["kind"] == "fresh" else None  # not again in a resumed run

        def on_step(step: int) -> None:
            if step == kill_at:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            summary = trainer.run(on_step=on_step if kill_at is not None else None)
        except _Stop as stop:
            code = stop.code
            if code:
                print(f"byztrain rank {rank}: {stop}", file=sys.stderr)
            return code, None
        except PeerExcluded:
            return 0, None
        except HonestMajorityLost:
            _closing_exchange(comm, rank, trainer.active, None)  # the writer's last gathers complete
            raise
        if writer is not None:
            writer.summary(summary)
        return code, _closing_exchange(comm, rank, trainer.active, summary)
    finally:
        if writer is not None:
            writer.close()
        comm.close()  # no thread left blocked in gloo: a normal interpreter exit (torchrun) stays clean


def _closing_exchange(comm: TorchCollective, rank: int, active: list[int], summary: dict | None) -> dict | None:
    """Everyone still active learns the writer's summary; it doubles as a final barrier."""
    with comm.unaccounted():
        got = comm.all_gather({rank: summary if rank == WRITER else None}, list(active))
    comm.flush(min(comm.timeout_s, 30.0))  # let the others take our last messages before we exit
    return got.get(WRITER) or summary


def _spawned(config: Config, rank: int, world: int, port: int, progress: bool, resume: bool) -> None:
    """Entry point of a locally spawned peer process."""
    torch.set_num_threads(config.runtime.threads or 1)
    code = 1
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=_connect_timeout(config))
        code, _ = _rank_main(config, rank, world, store, progress, resume)
    except ConfigError as exc:
        print(f"byztrain rank {rank}: {exc}", file=sys.stderr)
        code = 2
    except HonestMajorityLost:  # the parent reports it, with the reason from events.jsonl
        code = EXIT_MAJORITY_LOST
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the parent reports it
        code = 130
    except BaseException:  # noqa: BLE001 - report, then exit without running atexit handlers
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pending daemon threads may be blocked in gloo on a dead peer: do not join them


# ---- the entry point -------------------------------------------------------------------------------


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_distributed(config: Config, *, progress: bool = True, resume: bool = False) -> dict:
    if under_launcher():
        return _run_launched(config, progress, resume)
    return _run_local(config, progress, resume)


def _run_launched(config: Config, progress: bool, resume: bool) -> dict:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != config.peers:
        raise ConfigError(
            "peers", f"the launcher started {world} processes but the config has peers={config.peers}: one each"
        )
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        resume = True  # torchrun --max-restarts: a restarted group continues from the checkpoint
    torch.set_num_threads(config.runtime.threads or 1)
    code, summary = _rank_main(config, rank, world, None, progress, resume)
    if code:
        raise DistributedRunError(f"rank {rank} stopped (exit code {code}); resume with `byztrain run --resume`")
    if summary is None:  # a banned peer's process
        return {"name": config.name, "rank": rank, "stopped": "banned", "final_test_accuracy": None}
    return summary


def _run_local(config: Config, progress: bool, resume: bool) -> dict:
    import torch.multiprocessing as mp

    world = config.peers
    run_dir = Path(config.out_dir)
    if resume:
        ckpt.resume_plan(config, run_dir)  # fail here, with the message, rather than in every child
    ensure_key(run_dir)  # before any rank starts: they all read it
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world,
        is_master=True,
        wait_for_workers=False,
        timeout=_connect_timeout(config),
    )
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_spawned,
            name=f"byztrain-rank{r}",
            args=(config, r, world, store.port, progress, resume),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    reported: set[int] = set()
    try:
        while procs[WRITER].exitcode is None:
            for r, p in enumerate(procs):
                if r != WRITER and p.exitcode not in (None, 0, EXIT_MAJORITY_LOST) and r not in reported:
                    reported.add(r)
                    print(f"byztrain: rank {r} exited with {_describe(p.exitcode)}; the run goes on without it",
                          file=sys.stderr)
            procs[WRITER].join(0.2)
        code = procs[WRITER].exitcode
        grace = time.monotonic() + (10.0 if code in (0, EXIT_MAJORITY_LOST) else 0.0)
        for p in procs:
            p.join(max(grace - time.monotonic(), 0.0))
    finally:
        _stop_all(procs)
    if code == 0 and (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    if code == 2:
        raise ConfigError("<resume>", "rank 0 refused the run (see its message above)")
    if code == EXIT_MAJORITY_LOST:
        raise HonestMajorityLost(_majority_lost_reason(run_dir))
    info = ckpt.latest(run_dir)
    where = (
        f"the last checkpoint is at step {info['step']}" if info else "there is no checkpoint yet (it restarts)"
    )
    raise DistributedRunError(
        f"the distributed run stopped: rank 0 (the writer) exited with {_describe(code)}; metrics written so far "
        f"are in {run_dir}; {where}: continue with `byztrain run --resume --out {run_dir}`"
    )


def _majority_lost_reason(run_dir: Path) -> str:
    """The message for a run rank 0 stopped for losing its honest majority: its last majority_lost event."""
    reason, step = "see its majority_lost event", "?"
    try:
        for line in (run_dir / "events.jsonl").read_text().splitlines():
            e = json.loads(line)
            if isinstance(e, dict) and e.get("type") == "majority_lost":
                reason, step = e.get("reason", reason), e.get("step", step)
    except (OSError, ValueError):
        pass
    return (
        f"the distributed run stopped at step {step}: {reason}. The defense's guarantees no longer hold, so the "
        f"run does not go on; its metrics and events so far are kept in {run_dir}"
    )


def _describe(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _stop_all(procs) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.0))
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join(1.0)
