"""All-gather agreement over real gloo processes when peers die mid-collective (issue 6's double kill).

Four processes run one all-gather. Rank 3 dies in the data round after its message reached ranks 0 and 1
only; rank 2, which therefore lacks rank 3's message, dies in the first mask round after its mask reached
rank 0 only. With a single mask round the survivors disagree (rank 0 learns that rank 2 lacks rank 3's
message and drops it; rank 1 never hears it and keeps it) -- the divergence that once made BTARD ban an
honest peer for "malformed commitments". The survivors must return the same senders.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

WORLD = 4
# rank -> (exchange to cut short: 0 = the data round (_exchange), 1 = the first mask round (_exchange_fixed);
#          the ranks it still reaches)
CRASHES = {3: (0, [0, 1]), 2: (1, [0])}


def _peer(rank: int, store_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from byztrain.comm.torch_dist import TorchCollective

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    comm = TorchCollective(rank, WORLD, timeout_s=60)
    if rank in CRASHES:
        cut, reach = CRASHES[rank]
        calls = []

        def crashing(original, restrict):
            def exchange(outgoing, *rest):
                if len(calls) == cut:  # reach only `reach`, receive nothing, then die
                    original(*restrict(outgoing, reach))
                    comm.flush()
                    time.sleep(2.0)  # let the receivers post their receives before the socket closes
                    os._exit(0)
                calls.append(1)
                return original(outgoing, *rest)

            return exchange

        # the data round goes through _exchange (dict of payloads), the mask rounds through _exchange_fixed
        comm._exchange = crashing(
            comm._exchange, lambda out, reach: ({q: v for q, v in out.items() if q in reach}, [])
        )
        comm._exchange_fixed = crashing(comm._exchange_fixed, lambda mask, reach: (mask, list(reach)))
    got = comm.all_gather({rank: torch.full((3,), float(rank))}, list(range(WORLD)))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"senders": sorted(got)}, f)
    comm.flush(5.0)
    comm.close()
    os._exit(0)  # skip gloo's teardown with dead peers


def test_survivors_agree_when_two_peers_die_in_successive_rounds(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_peer, args=(r, str(tmp_path / "store"), str(tmp_path)), name=f"agree-rank{r}")
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a process hung"
    results = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert not (tmp_path / "rank2.json").exists() and not (tmp_path / "rank3.json").exists()
    # both survivors return the same senders: rank 2 (whose message everyone got) but not rank 3
    assert results[0]["senders"] == results[1]["senders"] == [0, 1, 2]
