"""Attack catalogue: one registry, hooks defined in `base`. Importing this package registers every attack."""

from byztrain.attacks import gradient  # noqa: F401  (registers)
from byztrain.attacks.base import (
    ATTACKS,
    Attack,
    AttackContext,
    attack_active,
    attack_names,
    build_attack,
    register,
    validate_attack,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "attack_active",
    "attack_names",
    "build_attack",
    "register",
    "validate_attack",
]
