"""When a run must stop: the honest-majority assumption no longer holds.

BTARD (and every robust aggregator here) is only robust while the Byzantine peers are a minority of the peers
that aggregate: b < (n - m)/2 for BTARD with m validators, b < n/2 for the baselines. Bans keep that true
only if they remove faulty peers: a ban of a Byzantine peer never breaks it, a ban of an honest one can.
The trainer knows which peers are Byzantine (ground truth) and checks the common state after every step's
bans (`lost`); both runtimes stop the run with `HonestMajorityLost` when either holds:

- more peers were banned than there are Byzantine peers (`byzantine`): the protocol convicted honest peers,
  which its guarantees exclude (e.g. gradients that are not bitwise reproducible). An honest peer banned for
  silence (a crashed or hung process of the distributed runtime, whose ban reason starts with "silent") is a
  crash, which the runtime tolerates, and is not counted here; it still counts for the majority below;
- the Byzantine peers among the active ones reach half of the aggregating ones (2·b' >= n' - m'), in a run
  that started with an honest majority (a baseline run may be configured without one, to study that).
"""

from __future__ import annotations

from collections.abc import Iterable

from byztrain.config import Config

#: the reason prefix of a ban for silence (no message arrived: a crash, a hang or a deliberate silence)
SILENCE = "silent"


class HonestMajorityLost(RuntimeError):
    """The run stopped because an assumption its defense relies on broke (the message says which)."""


def is_silence(reason: str) -> bool:
    return str(reason).startswith(SILENCE)


def validators_at(config: Config, n: int) -> int:
    """Peers that sit out the aggregation among `n` active ones (BTARD's validators, capped at n - 2)."""
    if config.defense.name != "btard":
        return 0
    return max(0, min(config.defense.validators, n - 2))


def _no_majority(config: Config, byzantine: int, n: int) -> bool:
    return 2 * byzantine >= n - validators_at(config, n)


def lost(
    config: Config, byzantine: Iterable[int], active: Iterable[int], banned: Iterable[int], silent: Iterable[int]
) -> dict | None:
    """None while the assumption holds; otherwise the event fields: `reason` (what broke, with the numbers)
    and the counts. `silent`: banned peers whose ban was for silence."""
    byz, active, banned = set(byzantine), sorted(active), sorted(banned)
    b = config.byzantine
    crashed = [p for p in banned if p not in byz and p in set(silent)]
    convicted = [p for p in banned if p not in byz and p not in crashed]
    counted = len(banned) - len(crashed)
    n, bad = len(active), len(byz.intersection(active))
    m = validators_at(config, n)
    reasons = []
    if counted > b:
        reasons.append(
            f"{counted} peer(s) banned but only {b} Byzantine: honest peer(s) {convicted} convicted, which the "
            f"protocol's guarantees exclude (look for the cause in their ban events)"
        )
    if _no_majority(config, bad, n) and not _no_majority(config, len(byz), config.peers):
        need = f"b < (n - m)/2, and {bad} >= ({n} - {m})/2" if m else f"b < n/2, and {bad} >= {n}/2"
        reasons.append(
            f"Byzantine share {bad} of {n} active peers: {config.defense.name} needs an honest majority, {need}"
        )
    if not reasons:
        return None
    return {
        "reason": "; ".join(reasons),
        "active": n,
        "byzantine_active": bad,
        "validators": m,
        "banned": len(banned),
        "honest_convicted": convicted,
        "honest_silent": crashed,
        "byzantine": b,
    }
