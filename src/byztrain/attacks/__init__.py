"""Attack catalogue: one registry, hooks defined in `base`. Importing this package registers every attack.

Modules: gradient (sign_flip, random_direction, small_change), data (label_flip, label_shuffle), temporal
(delayed_gradient), omniscient (ipm, ipm_0.6, alie, min_max, min_sum, mimic), optimal (inf, gaussian,
optimal_alie, optimal_ipm), protocol (bad_aggregation, false_accusation, lie_in_check, mprng_withhold,
self_cover, silent, validator_dodge). docs/attacks.md is the catalogue.
"""

from byztrain.attacks import data, gradient, omniscient, optimal, protocol, temporal  # noqa: F401  (registers)
from byztrain.attacks.base import (
    ATTACKS,
    Attack,
    AttackContext,
    attack_active,
    build_attack,
    register,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "attack_active",
    "build_attack",
    "register",
]
