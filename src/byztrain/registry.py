"""Plugin registries: every aggregator, pre-aggregator, defense, attack, dataset, model and split by name.

An entry carries what a user needs to choose it and what validation needs to refuse it: a one-line
summary, the variant of the literature it implements, its reference, its parameters (name, kind, default,
meaning) and its preconditions, as text and as a check. Config validation, `byztrain list`, the error
messages and the tables in docs/ all read these entries, so adding a plugin is one function (or class)
plus one entry.

This module imports no plugin. Plugins import it and register themselves; `byztrain.plugins` imports them
all, and importing the `byztrain` package imports `byztrain.plugins`, so the registries are full before any
config is validated.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from byztrain.errors import ConfigError

# ---- parameter kinds ---------------------------------------------------------------------------------


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int:
    """An integer in [low, high] (high None: unbounded)."""

    low: int | None = None
    high: int | None = None

    def error(self, v: Any) -> str | None:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        ok = ok and (self.low is None or v >= self.low) and (self.high is None or v <= self.high)
        return None if ok else f"must be {self.text()}"

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"an integer in [{self.low}, {self.high}]"
        if self.low is not None:
            return f"an integer >= {self.low}"
        return "an integer" + (f" <= {self.high}" if self.high is not None else "")


@dataclass(frozen=True)
class Real:
    """A finite number with optional bounds; ``open_low`` / ``open_high`` exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def error(self, v: Any) -> str | None:
        ok = _is_real(v) and math.isfinite(v)
        if ok and self.low is not None:
            ok = v > self.low if self.open_low else v >= self.low
        if ok and self.high is not None:
            ok = v < self.high if self.open_high else v <= self.high
        return None if ok else f"must be {self.text()}"

    def text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '<='} {self.high:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def error(self, v: Any) -> str | None:
        ok = any(v == c and type(v) is type(c) for c in self.values)
        return None if ok else f"must be {self.text()}"

    def text(self) -> str:
        return "one of " + ", ".join(map(repr, self.values))


@dataclass(frozen=True)
class OfType:
    """Any value of one Python type (a plugin's own check may narrow it)."""

    type_: type
    name: str

    def error(self, v: Any) -> str | None:
        return None if isinstance(v, self.type_) else f"must be {self.name}"

    def text(self) -> str:
        return self.name


BOOL = OfType(bool, "true or false")
TEXT = OfType(str, "a string")

Kind = Int | Real | Choice | OfType


@dataclass(frozen=True)
class Param:
    """One plugin parameter. A default of None means "not set" and also accepts null."""

    name: str
    kind: Kind
    default: Any
    meaning: str

    def check(self, value: Any, field_path: str) -> Any:
        if value is None and self.default is None:
            return None
        err = self.kind.error(value)
        if err is not None:
            null = " or null" if self.default is None else ""
            raise ConfigError(field_path, f"{err}{null}, got {value!r}")
        return float(value) if isinstance(self.kind, Real) else value

    def accepted(self) -> str:
        return self.kind.text() + (" or null" if self.default is None else "")


# ---- entries and registries --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A registered plugin.

    ``obj`` is what the plugin's kind builds from (an aggregator's binder, an attack class, a dataset
    loader); ``check`` raises ConfigError when a config breaks a precondition; ``preconditions`` says the
    same in words for `byztrain list` and docs/.
    """

    name: str
    summary: str
    obj: Any = None
    params: tuple[Param, ...] = ()
    preconditions: str = ""
    check: Callable[..., None] | None = None
    variant: str = ""
    reference: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def bind(self, given: Mapping | None, prefix: str, shared: frozenset[str] = frozenset()) -> dict[str, Any]:
        return bind_params(self.name, self.params, given, prefix, shared)

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


def bind_params(
    name: str, params: tuple[Param, ...], given: Mapping | None, prefix: str, shared: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``given`` checked against ``params``, defaults filled in. Keys in ``shared`` belong to other plugins
    fed by the same mapping and are skipped; any other unknown key is an error naming it."""
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise ConfigError(prefix, f"must be a mapping, got {type(given).__name__}")
    spec = {p.name: p for p in params}
    out = {}
    for key, value in given.items():
        if key in spec:
            out[key] = spec[key].check(value, f"{prefix}.{key}")
        elif key not in shared:
            hint = difflib.get_close_matches(str(key), list(spec), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            accepted = ", ".join(spec) or "none"
            raise ConfigError(f"{prefix}.{key}", f"unknown parameter for {name!r}{extra}; accepted: {accepted}")
    return {key: out.get(key, p.default) for key, p in spec.items()}


class Registry(Mapping[str, Entry]):
    """Entries of one kind, in registration order. ``field`` is the config key that names them."""

    def __init__(self, kind: str, field_path: str):
        self.kind = kind
        self.field = field_path
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> Entry:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} registered twice")
        self._entries[entry.name] = entry
        return entry

    def remove(self, name: str) -> None:
        del self._entries[name]

    def lookup(self, name: Any, field_path: str | None = None, also: tuple[str, ...] = ()) -> Entry:
        """The entry ``name``, or a ConfigError naming the field, the accepted names and the closest one."""
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        raise unknown(name, [*also, *self._entries], field_path or self.field, self.kind)

    def param_names(self) -> frozenset[str]:
        return frozenset(p.name for e in self._entries.values() for p in e.params)

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def unknown(name: Any, choices: list[str], field_path: str, kind: str = "value") -> ConfigError:
    hint = difflib.get_close_matches(str(name), choices, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(field_path, f"unknown {kind} {name!r}{extra}; accepted: {', '.join(choices)}")


AGGREGATORS = Registry("aggregator", "defense.name")
PRE_AGGREGATORS = Registry("pre-aggregator", "defense.pre")
#: defenses that are not one aggregation rule on a trusted server (btard); the rules above are defenses too
DEFENSES = Registry("defense", "defense.name")
ATTACKS = Registry("attack", "attack.name")
DATASETS = Registry("dataset", "task.dataset")
MODELS = Registry("model", "task.model")
SPLITS = Registry("split", "task.split")

#: the registries `byztrain list` shows, by the name it takes
KINDS: dict[str, Registry] = {
    "defenses": DEFENSES,
    "aggregators": AGGREGATORS,
    "pre-aggregators": PRE_AGGREGATORS,
    "attacks": ATTACKS,
    "datasets": DATASETS,
    "models": MODELS,
    "splits": SPLITS,
}

#: the entry of the trusted-server defense that wraps every rule in AGGREGATORS (registered by byztrain.defenses)
SERVER = "server"


def defense_names() -> list[str]:
    """Accepted values of defense.name: the protocol defenses, then every aggregation rule."""
    return [n for n in DEFENSES if n != SERVER] + list(AGGREGATORS)


def defense_entry(name: Any) -> Entry:
    """The DEFENSES entry that builds defense.name: its own, or the trusted server's for a rule."""
    if isinstance(name, str) and name in DEFENSES and name != SERVER:
        return DEFENSES[name]
    if isinstance(name, str) and name in AGGREGATORS:
        return DEFENSES[SERVER]
    raise unknown(name, defense_names(), "defense.name", "defense")
