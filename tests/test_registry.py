"""Registries: one entry drives validation, `byztrain list`, the docs tables and the run; no import cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from byztrain import Config, ConfigError, cli
from byztrain.api import run
from byztrain.config import config_reference
from byztrain.listing import catalog_table, generated_docs
from byztrain.registry import (
    AGGREGATORS,
    ATTACKS,
    DATASETS,
    KINDS,
    MODELS,
    PRE_AGGREGATORS,
    SPLITS,
    Entry,
    Int,
    Param,
)
from byztrain.rules import build_aggregator, need

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "byztrain"


def first_rows_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """The toy rule: the mean of the first k rows."""
    return x[:k].mean(dim=0)


@pytest.fixture
def toy_rule():
    """A rule added the way the docs say: one function and one registry entry, nothing else."""
    AGGREGATORS.add(
        Entry(
            "first_rows",
            "mean of the first k rows",
            obj=lambda b: lambda x: first_rows_mean(x, b.p["k"]),
            params=(Param("k", Int(1), 2, "rows averaged"),),
            check=lambda b: need(b.p["k"] <= b.n - b.f, "defense.params.k", f"must be <= n - f = {b.n - b.f}"),
            preconditions="k <= n - f",
            reference="a test",
        )
    )
    yield "first_rows"
    AGGREGATORS.remove("first_rows")


def _config(**defense) -> Config:
    return Config.from_dict({
        "peers": 6, "byzantine": 1, "attack": {"name": "sign_flip"}, "defense": defense,
        "train": {"steps": 3, "batch_size": 8, "eval_every": 3}, "log": {"tensorboard": False},
    })


def test_a_toy_rule_is_validated_listed_documented_and_runs(toy_rule, synthetic, tmp_path, capsys):
    cfg = _config(name=toy_rule, params={"k": 3})
    with pytest.raises(ConfigError, match="must be an integer >= 1") as bad:
        _config(name=toy_rule, params={"k": 0})
    assert bad.value.field == "defense.params.k"
    with pytest.raises(ConfigError, match=r"must be <= n - f = 5") as pre:
        _config(name=toy_rule, params={"k": 6})
    assert pre.value.field == "defense.params.k"
    with pytest.raises(ConfigError, match="did you mean 'k'"):
        _config(name=toy_rule, params={"kk": 2})

    assert cli.main(["list", "aggregators"]) == 0
    listed = capsys.readouterr().out
    assert "first_rows: mean of the first k rows" in listed and "k = 2  (an integer >= 1): rows averaged" in listed
    assert any(row.startswith("| `first_rows` |") and "a test" in row for row in catalog_table(AGGREGATORS))
    assert "| `first_rows` | `k` | an integer >= 1 | `2` | rows averaged |" in config_reference()
    assert "`first_rows`" in next(line for line in config_reference().splitlines() if "`defense.name`" in line)

    summary = run(cfg.with_overrides([f"log.out={tmp_path / 'run'}"]), quiet=True)
    assert summary["steps"] == 3
    x = torch.randn(6, 4)
    bound = build_aggregator(toy_rule, f=1, tau=1.0, params={"k": 3}, n=6)
    assert torch.equal(bound(x), x[:3].mean(dim=0))


def test_unknown_names_say_what_is_accepted_for_every_kind():
    cases = {
        "task.dataset": {"task": {"dataset": "fashion_mnist"}},
        "task.model": {"task": {"model": "cnnn"}},
        "task.split": {"task": {"split": "dirichlett"}},
        "attack.name": {"byzantine": 1, "attack": {"name": "signflip"}},
        "defense.name": {"defense": {"name": "krumm"}},
        "defense.pre": {"defense": {"name": "krum", "pre": ["bucketting"]}},
    }
    for field, data in cases.items():
        with pytest.raises(ConfigError, match="did you mean") as err:
            Config.from_dict(data)
        assert err.value.field == field, (field, str(err.value))


def test_plugin_parameters_fail_at_validation_not_when_the_run_is_built():
    for data, field in [
        ({"byzantine": 3, "defense": {"name": "btard", "params": {"scalar_bound": 2}}}, "defense.params.scalar_bound"),
        ({"byzantine": 3, "defense": {"name": "btard", "params": {"median": "mid"}}}, "defense.params.median"),
        ({"byzantine": 1, "attack": {"name": "alie", "params": {"ddof": 2}}}, "attack.params.ddof"),
        ({"byzantine": 1, "attack": {"name": "sign_flip+ipm", "params": {"ipm": 3}}}, "attack.params.ipm"),
        ({"defense": {"name": "dnc", "params": {"sub_dim": 0}}}, "defense.params.sub_dim"),
        ({"defense": {"name": "bulyan", "f": 4}}, "defense.f"),
    ]:
        with pytest.raises(ConfigError) as err:
            Config.from_dict(data)
        assert err.value.field == field, (data, str(err.value))


def test_every_entry_documents_itself():
    for kind, registry in KINDS.items():
        for name, e in registry.items():
            assert e.summary and e.obj is not None, (kind, name)
            for p in e.params:
                assert p.meaning, (kind, name, p.name)
                assert p.default is None or p.kind.error(p.default) is None, (kind, name, p.name, p.default)
    assert set(DATASETS) >= {"fashion-mnist", "mnist", "cifar10"} and set(MODELS) == {"cnn", "resnet18"}
    assert set(SPLITS) == {"iid", "dirichlet", "gamma_similarity", "extreme"}
    assert {"arc", "clipping"} <= set(PRE_AGGREGATORS) and "validator_dodge" in ATTACKS


def test_list_prints_every_kind(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, registry in KINDS.items():
        assert len(re.findall(rf"^{kind} \(", out, re.M)) == 1
        for name in registry:
            assert f"  {name}: " in out or name == "server", name


def test_the_docs_tables_are_generated_from_the_registries():
    docs = generated_docs(ROOT)
    assert {p.name for p in docs} >= {"defenses.md", "attacks.md"}
    for path, text in docs.items():
        assert path.read_text() == text, f"{path.name} is out of date: run `make docs`"


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(modules imported at module level, byztrain modules imported inside functions) of a source file."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mods = [("." * node.level) + (node.module or "")]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        inside = any(
            isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.lineno <= node.lineno <= f.end_lineno
            for f in ast.walk(tree)
        )
        for m in mods:
            if inside and (m.startswith("byztrain") or m.startswith(".")):
                nested.append(m)
            elif not inside:
                top.add(m)
    return top, nested


def test_config_and_the_registry_import_no_plugin_and_nothing_dodges_a_cycle():
    allowed = {"byztrain.errors", "byztrain.registry", "byztrain.listing"}
    for name in ("errors", "registry", "listing", "config"):
        top, _ = _imports(SRC / f"{name}.py")
        ours = {m for m in top if m.startswith("byztrain")}
        assert ours <= allowed, (name, ours - allowed)
    nested = {str(p.relative_to(SRC)): _imports(p)[1] for p in SRC.rglob("*.py")}
    assert {k: v for k, v in nested.items() if v} == {}


def test_the_defaults_listed_are_what_an_attack_gets_when_no_key_is_set():
    cfg = Config.from_dict({"byzantine": 3, "attack": {"name": "sign_flip"}})
    attack = ATTACKS["sign_flip"].obj({}, cfg, peer=0)
    assert attack.params == ATTACKS["sign_flip"].defaults == {"scale": -1000.0}
