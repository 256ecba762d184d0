"""Validator drawing: who sits out step t to recheck whom, from the previous step's shared randomness.

Step t's validators and their targets are a pure function of (r_{t-1}, t, active peers at t, the peers that
aggregated at t-1), so every peer derives the same pairs, and nobody knew them when committing to its step
t-1 gradient (r_{t-1} comes out of MPRNG after those commitments). Drawing:

- m validators uniformly without replacement among the active peers (Byzantine ones included: they are
  part of the active set and the protocol cannot tell them apart);
- each validator independently gets one target, uniform among the peers that committed a gradient at
  t-1 (i.e. were not validators then), are still active, and are not the validator itself. Two validators
  may draw the same target.

m is capped so that at least two peers still aggregate (m <= active - 2). At the first step there is no
previous step and no validator. A validator computes no gradient at step t and holds no partition; it
recomputes its target's step t-1 gradient from the public parameters x_{t-1} and seed xi_{t-1}.

The per-step probability that a given cheater is checked by an honest validator is about
m/|candidates| * (honest share of the validators): (1/n) * (n - b)/n for m = 1, as in the paper's notes.
"""

from __future__ import annotations

import hashlib
import random
import struct


def validator_rng(shared_random: int, step: int) -> random.Random:
    blob = b"byztrain/validators" + struct.pack("<Qq", shared_random & (2**64 - 1), step)
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest(), "little"))


def choose_validators(
    shared_random: int,
    step: int,
    active: list[int] | tuple[int, ...],
    previous_workers: list[int] | tuple[int, ...] | None,
    m: int,
) -> list[tuple[int, int | None]]:
    """[(validator, target)] for step `step`, sorted by validator; empty when m == 0 or there is no
    previous step. A target is None when no candidate exists (the validator still sits out)."""
    if m <= 0 or previous_workers is None:
        return []
    active = sorted(active)
    m = min(m, len(active) - 2)
    if m <= 0:
        return []
    rng = validator_rng(shared_random, step)
    validators = sorted(rng.sample(active, m))
    still = set(active)
    prev = sorted(p for p in previous_workers if p in still)
    pairs = []
    for v in validators:
        candidates = [p for p in prev if p != v]
        if candidates:
            pairs.append((v, candidates[rng.randrange(len(candidates))]))
        else:
            pairs.append((v, None))
    return pairs
