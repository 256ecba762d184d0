"""Run configuration: dataclasses, YAML round-trip, dotted overrides, validation.

One `Config` describes one run completely. It is frozen-by-convention (we never mutate a config after
validation), picklable (sweeps send it to worker processes) and has a stable `config_hash()` used to skip
finished runs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from byztrain.errors import ConfigError
from byztrain.listing import default_text, params_table
from byztrain.registry import (
    AGGREGATORS,
    ATTACKS,
    DATASETS,
    DEFENSES,
    MODELS,
    PRE_AGGREGATORS,
    SERVER,
    SPLITS,
    defense_entry,
    defense_names,
)

__all__ = ["Config", "ConfigError"]


# ---- YAML with numbers as people type them --------------------------------------------------------
# PyYAML implements YAML 1.1, whose floats need a dot and a signed exponent: '1e7', '1e-3' and '1E+2' load
# as strings. YAML 1.2 (and every other tool a config comes from) reads them as floats; so do we, in config
# files, grid files and `key=value` overrides alike.
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")
_FLOAT_FIRST = list("-+0123456789.")


class YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads YAML 1.2 floats (1e7, 1e-3, 1E+2, .5)."""


class YamlDumper(yaml.SafeDumper):
    """yaml.SafeDumper that quotes strings YamlLoader would read back as floats (a name '1e7')."""


for _cls in (YamlLoader, YamlDumper):
    # Appended after YAML 1.1's own resolvers, so ints, 1.1 floats, dates and sexagesimals keep their types.
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, _FLOAT_FIRST)


def yaml_load(text: str) -> Any:
    """Parse YAML text with YamlLoader (safe: plain data only)."""
    return yaml.load(text, Loader=YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def yaml_dump(data: Any) -> str:
    return yaml.dump(data, Dumper=YamlDumper, sort_keys=False)


SCHEDULES = ("constant", "cosine")
RUNTIMES = ("simulated", "distributed")


@dataclass
class TaskConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "cnn"
    split: str = "iid"
    alpha: float = 0.5
    # gamma_similarity split: the share of samples dealt iid (the rest sorted by label), in [0, 1].
    gamma: float = 0.5
    # Random crop + flip driven by the peer's public seed (CIFAR-10 only; docs/cifar.md).
    augment: bool = False


@dataclass
class AttackConfig:
    name: str = "none"
    start: int = 0
    stop: int | None = None
    every: int = 1
    params: dict = field(default_factory=dict)


@dataclass
class DefenseConfig:
    name: str = "mean"
    tau: float = 1.0
    validators: int = 1
    pre: list = field(default_factory=list)
    # Number of Byzantine inputs a baseline rule is told to tolerate; None = the run's `byzantine`.
    f: int | None = None
    cclip_tol: float = 1e-6
    cclip_max_iters: int = 1000
    params: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    # Each peer sends its own momentum buffer m_i <- beta m_i + g_i instead of g_i (0: off); the server's
    # `momentum` still applies to the aggregate. Trusted-server defenses only.
    worker_momentum: float = 0.0
    weight_decay: float = 0.0
    # Clip the aggregated update to this L2 norm before the optimizer (null: off), as max_grad_norm in
    # the BTARD ALBERT setup: bounds what one step can do, whoever wrote the update.
    clip_norm: float | None = None
    schedule: str = "constant"
    # Cosine horizon in steps; null = train.steps. Longer than train.steps reproduces runs stopped early
    # on a longer schedule (the BTARD paper: T_max 25,000, stopped at 5,100).
    schedule_steps: int | None = None
    eval_every: int = 100


@dataclass
class RuntimeConfig:
    kind: str = "simulated"
    device: str = "cpu"
    timeout_s: float = 120.0
    threads: int | None = None
    # Steps between checkpoints in the run folder (`byztrain run --resume` continues from the last one).
    # null = the runtime's default: off (0) for simulated, every 50 steps for distributed; 0 = off.
    checkpoint_every: int | None = None


@dataclass
class LogConfig:
    out: str | None = None
    tensorboard: bool = True
    every: int = 10


# Keys added after runs were published: at their default (off) they stay out of config_hash, so a finished
# run's hash, and with it a sweep's "already finished", does not change when the key appears.
_HASHED_ONLY_WHEN_SET = (("train", "worker_momentum", 0.0),)


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    peers: int = 16
    byzantine: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, *, validate: bool = True) -> Config:
        cfg = _build(cls, data or {}, "")
        if validate:
            cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Config:
        path = Path(path)
        if not path.exists():
            raise ConfigError("<file>", f"config file {str(path)!r} does not exist")
        data = yaml_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError("<file>", f"{path} must contain a YAML mapping, got {type(data).__name__}")
        data = apply_overrides(data, overrides or [])
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml_dump(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def with_overrides(self, overrides: list[str] | dict) -> Config:
        data = self.to_dict()
        if isinstance(overrides, dict):
            overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
        return Config.from_dict(apply_overrides(data, overrides))

    def config_hash(self) -> str:
        """Stable hash of everything that affects results (output location and logging excluded)."""
        data = self.to_dict()
        data.pop("log", None)
        data["runtime"].pop("threads", None)
        data["runtime"].pop("checkpoint_every", None)
        for section, key, default in _HASHED_ONLY_WHEN_SET:
            if data[section][key] == default:
                del data[section][key]
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __hash__(self) -> int:
        return int(self.config_hash(), 16)

    @property
    def out_dir(self) -> Path:
        return Path(self.log.out) if self.log.out else Path("runs") / self.name

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> Config:
        """Raise ConfigError for the first bad field; return self when the config is usable."""
        _check(isinstance(self.name, str) and self.name.strip() != "", "name", "must be a non-empty string")
        _check(self.peers >= 1, "peers", f"must be >= 1, got {self.peers}")
        _check(self.byzantine >= 0, "byzantine", f"must be >= 0, got {self.byzantine}")
        _check(
            self.byzantine < self.peers,
            "byzantine",
            f"must be < peers ({self.peers}): at least one peer must be honest, got {self.byzantine}",
        )
        DATASETS.lookup(self.task.dataset)
        MODELS.lookup(self.task.model)
        SPLITS.lookup(self.task.split)
        _check(self.task.alpha > 0, "task.alpha", f"must be > 0, got {self.task.alpha}")
        _check(0 <= self.task.gamma <= 1, "task.gamma", f"must be in [0, 1], got {self.task.gamma}")

        _check(self.attack.start >= 0, "attack.start", f"must be >= 0, got {self.attack.start}")
        _check(
            self.attack.stop is None or self.attack.stop > self.attack.start,
            "attack.stop",
            f"must be null or > attack.start ({self.attack.start}), got {self.attack.stop}",
        )
        _check(self.attack.every >= 1, "attack.every", f"must be >= 1, got {self.attack.every}")
        _check(isinstance(self.attack.params, dict), "attack.params", "must be a mapping")
        self._validate_attack()

        d = self.defense
        _check(d.tau > 0, "defense.tau", f"must be > 0, got {d.tau}")
        _check(d.validators >= 0, "defense.validators", f"must be >= 0, got {d.validators}")
        _check(d.cclip_tol > 0, "defense.cclip_tol", f"must be > 0, got {d.cclip_tol}")
        _check(d.cclip_max_iters >= 1, "defense.cclip_max_iters", f"must be >= 1, got {d.cclip_max_iters}")
        _check(d.f is None or d.f >= 0, "defense.f", f"must be null or >= 0, got {d.f}")
        defense_entry(d.name).check(self)

        t = self.train
        _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
        _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
        _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
        _check(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
        _check(
            0 <= t.worker_momentum < 1, "train.worker_momentum", f"must be in [0, 1), got {t.worker_momentum}"
        )
        _check(
            t.worker_momentum == 0 or defense_entry(d.name) is DEFENSES[SERVER],
            "train.worker_momentum",
            f"needs a trusted-server defense (mean or a rule), not {d.name!r}: BTARD's validators recompute "
            "gradients, which a momentum buffer is not",
        )
        _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
        _check(
            t.clip_norm is None or t.clip_norm > 0, "train.clip_norm", f"must be null or > 0, got {t.clip_norm}"
        )
        _check(
            not t.nesterov or t.momentum > 0, "train.nesterov", "needs train.momentum > 0 (Nesterov momentum)"
        )
        _choice(t.schedule, SCHEDULES, "train.schedule")
        _check(
            t.schedule_steps is None or t.schedule_steps >= t.steps,
            "train.schedule_steps",
            f"must be null or >= train.steps ({t.steps}), got {t.schedule_steps}",
        )
        _check(t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}")

        r = self.runtime
        _choice(r.kind, RUNTIMES, "runtime.kind")
        _check(
            r.device == "cpu" or r.device.startswith("cuda"),
            "runtime.device",
            f"must be 'cpu' or 'cuda[:N]', got {r.device!r}",
        )
        _check(r.timeout_s > 0, "runtime.timeout_s", f"must be > 0, got {r.timeout_s}")
        _check(r.threads is None or r.threads >= 1, "runtime.threads", f"must be null or >= 1, got {r.threads}")
        _check(
            r.checkpoint_every is None or r.checkpoint_every >= 0,
            "runtime.checkpoint_every",
            f"must be null (runtime default), 0 (off) or a number of steps >= 1, got {r.checkpoint_every}",
        )
        _check(self.log.every >= 1, "log.every", f"must be >= 1, got {self.log.every}")
        return self

    def _validate_attack(self) -> None:
        _check(bool(str(self.attack.name).strip("+ ")), "attack.name", "must not be empty; use 'none' for no attack")
        parts = attack_parts(self)
        if parts:
            _check(self.byzantine >= 1, "byzantine", f"attack {self.attack.name!r} needs byzantine >= 1, got 0")
        for name, params in parts:
            ATTACKS.lookup(name, also=("none",)).check(self, params)


def attack_parts(config: Config) -> list[tuple[str, dict]]:
    """(name, params) of each attack in attack.name: "a+b" runs both, and attack.params is then keyed by name."""
    names = [n.strip() for n in str(config.attack.name).split("+") if n.strip()]
    if names == ["none"]:
        return []
    if len(names) == 1:
        return [(names[0], dict(config.attack.params))]
    for key in config.attack.params:
        _check(key in names, f"attack.params.{key}", f"with a combined attack, params are keyed by attack name; accepted: {', '.join(names)}")
    parts = [(n, config.attack.params.get(n) or {}) for n in names]
    for n, params in parts:
        _check(isinstance(params, dict), f"attack.params.{n}", f"must be a mapping, got {type(params).__name__}")
    return [(n, dict(params)) for n, params in parts]


def _check(ok: bool, field_path: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_path, message)


def _choice(value: Any, choices: tuple[str, ...] | list[str], field_path: str) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(field_path, f"unknown value {value!r}{extra}; accepted: {', '.join(choices)}")


# ---- building dataclasses from plain data, with type checks -------------------------------------


# Names users bring from other tools, mapped to ours (for the "did you mean" hint only).
_ALIASES = {
    "learning_rate": "lr",
    "batch": "batch_size",
    "num_peers": "peers",
    "workers": "peers",
    "num_workers": "peers",
    "num_byzantine": "byzantine",
    "f": "byzantine",
    "aggregator": "name",
    "epochs": "steps",
}


def _suggest(key: str, names: list[str]) -> list[str]:
    aliases = {a: t for a, t in _ALIASES.items() if t in names}
    match = difflib.get_close_matches(key, names + list(aliases), n=1)
    return [aliases.get(match[0], match[0])] if match else []


def _build(cls: type, data: Any, prefix: str):
    where = prefix.rstrip(".") or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            hint = _suggest(str(key), names)
            extra = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key{extra} Valid keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    origin = get_origin(tp)
    if origin is Union or str(origin) == "types.UnionType":
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(path, f"must be a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(path, f"must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(path, f"must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(path, f"must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is list or origin is list:
        if value is None:
            return []
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {value!r}")
        return list(value)
    return value


# ---- dotted overrides ---------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text, "override must look like key=value (e.g. train.lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "override has an empty key")
    value = yaml_load(raw) if raw.strip() else ""
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys), f"'{k}' is not a section, cannot set a sub-key")
            node = child
        node[keys[-1]] = value
    return data


# ---- the reference in docs/config.md --------------------------------------------------------------------
# Every key's accepted values and meaning; its type and default come from the dataclasses above. docs/config.md
# is generated from this (`make docs`), and tests/test_config_doc.py fails when either drifts. An accepted
# value of None means the key is a choice and the list comes from the code that checks it (`_choices`).
FIELD_DOCS: dict[str, tuple[str | None, str]] = {
    "name": ("non-empty string", "run name; the run folder is `runs/<name>` unless `log.out` is set"),
    "seed": ("integer", "seeds everything: model init, shards, minibatches, which peers are Byzantine"),
    "peers": ("integer >= 1", "total peers, Byzantine ones included"),
    "byzantine": (
        "integer, 0 <= byzantine < peers (btard: < (peers - defense.validators) / 2)",
        "number of Byzantine peers, drawn from the seed; peer 0 (which evaluates and logs) is always honest",
    ),
    "task.dataset": (None, "dataset; files are found as described in README.md, *Data*"),
    "task.data_dir": ("path or null", "folder holding the dataset files (null: the default search path)"),
    "task.model": (None, "`cnn` (about 109k parameters, 28x28 greyscale) or `resnet18` (CIFAR-10)"),
    "task.split": (None, "how training data is sharded over peers: `iid`, `dirichlet` label skew, `gamma_similarity` (a share gamma iid, the rest sorted by label) or `extreme` (sorted by label, contiguous shards)"),
    "task.alpha": ("number > 0", "Dirichlet concentration for `task.split: dirichlet` (smaller: more skewed)"),
    "task.gamma": ("number in [0, 1]", "share of iid samples for `task.split: gamma_similarity` (1: iid, 0: sorted by label)"),
    "task.augment": ("true or false", "random crop + flip from the peer's public seed (CIFAR-10; docs/cifar.md)"),
    "attack.name": (None, "the attack the Byzantine peers run (docs/attacks.md); `a+b` combines two"),
    "attack.start": ("integer >= 0", "first step of the attack window (steps count from 1)"),
    "attack.stop": ("null or integer > attack.start", "the window ends before this step (null: never)"),
    "attack.every": ("integer >= 1", "attack every `every`-th step of the window"),
    "attack.params": (
        "mapping; keys per attack below",
        "the attack's parameters; with a combined attack `a+b`, keyed by attack name",
    ),
    "defense.name": (None, "the aggregation: `mean` (no defense), `btard` (the protocol) or a baseline rule"),
    "defense.tau": ("number > 0 (btard: finite, >= 1e-20)", "CenteredClip radius (per partition for btard; cclip_ps on the server)"),
    "defense.validators": (
        "integer >= 0, < peers - 1",
        "btard: validators per step (m), who recompute a chosen peer's gradient instead of aggregating",
    ),
    "defense.pre": (None, "pre-aggregators applied in order before a baseline rule (not btard)"),
    "defense.f": ("null or integer >= 0", "Byzantine count a baseline rule is told to tolerate (null: `byzantine`)"),
    "defense.cclip_tol": ("number > 0 (btard: >= 1e-7)", "CenteredClip relative stopping tolerance (btard: of the fixed-point residual, relative to sum_i min(d_i, tau))"),
    "defense.cclip_max_iters": ("integer >= 1", "CenteredClip iteration cap"),
    "defense.params": ("mapping; keys per defense below", "rule-specific parameters"),
    "train.steps": ("integer >= 1", "optimizer steps"),
    "train.batch_size": ("integer >= 1", "samples per peer per step"),
    "train.lr": ("number > 0", "SGD learning rate (the peak, with `schedule: cosine`)"),
    "train.momentum": ("number in [0, 1)", "SGD momentum"),
    "train.nesterov": ("true or false", "Nesterov momentum (needs momentum > 0)"),
    "train.worker_momentum": (
        "number in [0, 1); > 0 needs a trusted-server defense",
        "worker momentum: each peer sends m_i <- beta m_i + g_i instead of its gradient (0: off; docs/defenses.md)",
    ),
    "train.weight_decay": ("number >= 0", "SGD weight decay"),
    "train.clip_norm": (
        "null or number > 0",
        "clip the aggregated update to this L2 norm before SGD (null: off); bounds what one step can do",
    ),
    "train.schedule": (None, "learning-rate schedule: `constant`, or `cosine` down to 0 at `schedule_steps`"),
    "train.schedule_steps": (
        "null or integer >= train.steps",
        "cosine horizon (null: `train.steps`; longer reproduces a run stopped early on a longer schedule)",
    ),
    "train.eval_every": ("integer >= 1", "steps between full test-set evaluations (and at the last step)"),
    "runtime.kind": (None, "`simulated`: every peer in this process; `distributed`: a process per peer"),
    "runtime.device": ("`cpu` or `cuda[:N]`", "torch device"),
    "runtime.timeout_s": ("number > 0", "timeout in seconds on every collective of the distributed runtime"),
    "runtime.threads": ("null or integer >= 1", "torch threads for this run (null: torch's default; sweeps use 1)"),
    "runtime.checkpoint_every": (
        "null, 0 or integer >= 1",
        "steps between checkpoints for `byztrain run --resume` (null: off simulated, 50 distributed; 0: off)",
    ),
    "log.out": ("path or null", "run folder (null: `runs/<name>`)"),
    "log.tensorboard": ("true or false", "write TensorBoard event files to `<run folder>/tb`"),
    "log.every": ("integer >= 1", "steps per metrics line (values averaged over the window)"),
}


def _choices(key: str) -> list[str] | None:
    """The accepted values of a choice key, from the tuples and registries validation checks against."""
    registries = {
        "attack.name": ["none", *sorted(ATTACKS)],
        "defense.name": defense_names(),
        "defense.pre": list(PRE_AGGREGATORS),
        "task.dataset": list(DATASETS),
        "task.model": list(MODELS),
        "task.split": list(SPLITS),
    }
    if key in registries:
        return registries[key]
    fixed = {
        "train.schedule": SCHEDULES,
        "runtime.kind": RUNTIMES,
    }
    return list(fixed[key]) if key in fixed else None


def config_fields(cls: type | None = None, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, type, default) of every leaf key of the config, in declaration order."""
    cls = cls or Config
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append((f"{prefix}{f.name}", tp, default))
    return out


def _type_name(tp: Any) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "mapping", list: "list"}
    args = get_args(tp)
    if type(None) in args:
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
    return names.get(get_origin(tp) or tp, str(tp))


def _accepted_text(key: str) -> str:
    choices = _choices(key)
    if choices is None:
        return FIELD_DOCS[key][0] or ""
    text = ", ".join(f"`{c}`" for c in choices)
    if key == "attack.name":
        text += "; `a+b` for two at once"
    if key == "defense.pre":
        text = "a list of " + text
    return text


def config_reference() -> str:
    """docs/config.md: every key with its type, default, accepted values and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from src/byztrain/config.py (the dataclasses and FIELD_DOCS) by `make docs`;",
        "     tests/test_config_doc.py fails when this file and the code disagree. Do not edit by hand. -->",
        "",
        "A run is one YAML mapping; every key is optional. On the command line any key can be set as",
        "`key=value`, dotted for sections (`train.lr=0.05`, `attack.params.scale=-10`); values are read as",
        "YAML, and numbers may be written `0.001`, `1e-3`, `1E+2` or `.5`. A list in a grid file expands into",
        "several runs (docs/experiments.md). An unknown key or a bad value stops the run with an error naming",
        "the field and what it accepts.",
        "",
    ]
    section = None
    for key, tp, default in config_fields():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            title = f"`{head}`" if head else "Top level"
            lines += ["", f"## {title}", "", "| key | type | default | accepted | meaning |", "|---|---|---|---|---|"]
        cells = [f"`{key}`", _type_name(tp), f"`{default_text(default)}`", _accepted_text(key), FIELD_DOCS[key][1]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", *_attack_params_table(), "", *_defense_params_table()]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _attack_params_table() -> list[str]:
    return params_table(ATTACKS, "`attack.params` by attack", "Parameters not set take these defaults (docs/attacks.md).")


def _defense_params_table() -> list[str]:
    intro = "One mapping feeds the rule and its pre-aggregators (docs/defenses.md)."
    lines = params_table(DEFENSES, "`defense.params` by defense", intro)
    lines += ["", *params_table(AGGREGATORS, "`defense.params` by aggregation rule", intro)]
    return [*lines, "", *params_table(PRE_AGGREGATORS, "`defense.params` by pre-aggregator", intro)]


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """Command-line items: at most one config file path, and any number of key=value overrides."""
    config_path = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise SystemExit(f"error: more than one config file given ({config_path!r}, {item!r})")
    return config_path, overrides
