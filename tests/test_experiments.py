"""Sweeps and reports: grid expansion, naming, shards, resume, report outputs and figures.

Most tests use a fake runner (writes a run folder without training) or fake run folders; one tiny real sweep
runs end to end through the CLI with --jobs 2.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from byztrain.config import Config, ConfigError
from byztrain.experiments import report as rep
from byztrain.experiments.sweep import (
    expand_grid,
    name_points,
    parse_shard,
    plan,
    run_status,
    select_shard,
    sweep,
    validate_points,
)
from byztrain.runtime.trainer import choose_byzantine

BASE = {"peers": 8, "byzantine": 3, "train": {"steps": 4, "eval_every": 2}, "log": {"tensorboard": False}}


def grid(**extra) -> dict:
    g = json.loads(json.dumps(BASE))
    for k, v in extra.items():
        node = g
        *head, last = k.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return g


# ---- a fake runner: a run folder in milliseconds (module-level so spawned workers can import it) ---------


def fake_runner(config_data: dict, run_dir: str) -> dict:
    path = Path(run_dir)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True)
    config = Config.from_dict(config_data)
    if config.train.lr == 0.123:  # the designated failing grid point
        (path / "error.txt").write_text("RuntimeError: boom\n")
        return {"status": "failed", "error": "RuntimeError: boom"}
    config.save(path / "config.yaml")
    (path / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "test_accuracy": 0.1, "active_peers": 8}) + "\n"
    )
    # A marker proving which invocation wrote this folder.
    (path / "ran.txt").write_text(str(path.stat().st_mtime_ns))
    summary = {
        "final_test_accuracy": 0.5,
        "best_test_accuracy": 0.5,
        "steps": 4,
        "wall_seconds": 0.01,
        "byzantine_peers": [1, 2, 3],
        "banned": {},
        "honest_banned": 0,
        "config_hash": config.config_hash(),
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return {"status": "ok", "summary": summary}


# ---- expansion and naming -----------------------------------------------------------------------------


def test_list_keys_expand_as_a_product_in_file_order():
    points = name_points(expand_grid(grid(seed=[0, 1], attack__name=["none", "sign_flip"], attack__start=2)))
    assert [p.name for p in points] == [
        "attack.name=none,seed=0",
        "attack.name=sign_flip,seed=0",
        "attack.name=none,seed=1",
        "attack.name=sign_flip,seed=1",
    ]
    assert points[1].data["attack"] == {"name": "sign_flip", "start": 2}
    assert points[1].data["peers"] == 8  # fixed keys are copied, not expanded
    assert "attack.start" not in points[1].params  # a fixed value is not a parameter


def test_section_variants_list_typed_keys_and_literal_lists():
    g = grid(defense=[{"name": "mean"}, {"name": "mean", "pre": [["bucketing"], ["nnm", "bucketing"]]}])
    points = name_points(expand_grid(g))
    assert [p.data["defense"] for p in points] == [
        {"name": "mean"},
        {"name": "mean", "pre": ["bucketing"]},
        {"name": "mean", "pre": ["nnm", "bucketing"]},
    ]
    assert [p.name for p in points] == [  # defense.name does not vary; a missing key keeps its default
        "defense.pre=default",
        "defense.pre=bucketing",
        "defense.pre=nnm+bucketing",
    ]
    # A flat list at a list-typed key is one value, not a sweep.
    (only,) = expand_grid(grid(defense={"name": "mean", "pre": ["bucketing", "nnm"]}))
    assert only.data["defense"]["pre"] == ["bucketing", "nnm"] and only.params == {}
    # Variants nest: btard with tau in {1, 10} next to mean -> 3 runs.
    g = grid(defense=[{"name": "mean"}, {"name": "btard", "tau": [1, 10]}])
    assert [p.name for p in name_points(expand_grid(g))] == [
        "defense.name=mean",
        "defense.name=btard,defense.tau=1",
        "defense.name=btard,defense.tau=10",
    ]
    # Inside a free-form mapping a list expands; a list of one list is a literal list.
    points = expand_grid(grid(attack__params={"z": [1.0, 2.0], "sizes": [[1, 2]]}))
    assert [p.data["attack"]["params"] for p in points] == [
        {"z": 1.0, "sizes": [1, 2]},
        {"z": 2.0, "sizes": [1, 2]},
    ]


def test_a_list_of_mappings_is_variants_of_the_whole_config():
    # keys that must change together across sections (peers, byzantine, defense.validators) in one grid
    g = [grid(peers=8, byzantine=3, defense={"name": "btard", "validators": 1}, seed=[0, 1]),
         grid(peers=8, byzantine=2, defense={"name": "btard", "validators": 3}, seed=[0, 1])]
    root, points, _ = plan(g, ["train.steps=3"], out="x")
    assert [(p.config.byzantine, p.config.defense.validators, p.config.seed) for p in points] == [
        (3, 1, 0), (3, 1, 1), (2, 3, 0), (2, 3, 1)
    ]
    assert {p.config.train.steps for p in points} == {3}  # an override reaches every variant
    assert points[0].name == "byzantine=3,defense.validators=1,seed=0"
    with pytest.raises(ConfigError, match="list of mappings"):
        expand_grid([grid(), "btard"])
    with pytest.raises(ConfigError, match="byzantine.*grid point 2/2"):  # each variant is validated
        plan([grid(), grid(byzantine=8)], out="x")


def test_expansion_errors_name_the_field():
    with pytest.raises(ConfigError, match="defense.pre.*list of lists"):
        expand_grid(grid(defense={"pre": [[], "bucketing"]}))
    with pytest.raises(ConfigError, match="'seed'.*empty list"):
        expand_grid(grid(seed=[]))
    with pytest.raises(ConfigError, match="'defense'.*section"):
        expand_grid(grid(defense=["mean", "btard"]))


def test_names_are_deterministic_sanitised_and_unique():
    g = grid(attack__name=["sign_flip"], attack__params={"note": ["a/b", "a_b", "x y:z"]}, attack__start=1)
    points = name_points(expand_grid(g))
    names = [p.name for p in points]
    assert names == [p.name for p in name_points(expand_grid(g))]  # deterministic
    assert len(set(names)) == 3
    for n in names:
        assert "/" not in n and " " not in n and ":" not in n
        assert n.startswith("attack.params.note=")
    # 'a/b' and 'a_b' sanitise alike: both get a hash suffix.
    assert names[0] != names[1] and names[0].startswith("attack.params.note=a_b-")
    long = name_points(expand_grid(grid(attack__params={"note": ["x" * 400, "y" * 400]})))
    assert all(len(p.name) <= 150 for p in long) and long[0].name != long[1].name
    (single,) = name_points(expand_grid(grid(seed=[3])))
    assert single.name == "run"  # nothing varies


def test_every_point_is_validated_up_front_with_field_and_grid_point():
    points = name_points(expand_grid(grid(seed=[0, 1], train__lr=[0.1, -1.0])))
    with pytest.raises(ConfigError) as err:
        validate_points(points)
    assert err.value.field == "train.lr"
    assert "grid point 3/4 (seed=0,train.lr=-1)" in str(err.value)
    with pytest.raises(ConfigError, match="attack.name.*grid point 2/2"):
        plan(grid(attack__name=["sign_flip", "sign_flp"]))


def test_shards_cover_the_grid_exactly_once():
    points = expand_grid(grid(seed=[0, 1, 2, 3, 4], attack__name=["none", "sign_flip"]))
    for k in (1, 2, 3, 7):
        shards = [select_shard(points, (i, k)) for i in range(1, k + 1)]
        indices = sorted(p.index for s in shards for p in s)
        assert indices == list(range(len(points)))
    assert [p.index for p in select_shard(points, parse_shard("2/3"))] == [1, 4, 7]
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_run_status_finished_unfinished_and_hash_mismatch(tmp_path):
    config = Config.from_dict(BASE)
    d = tmp_path / "r"
    assert run_status(d, config) == "new"
    d.mkdir()
    (d / "metrics.jsonl").write_text("")
    assert run_status(d, config) == "rerun"  # unfinished: no summary
    (d / "summary.json").write_text(json.dumps({"config_hash": config.config_hash()}))
    assert run_status(d, config) == "finished"
    assert run_status(d, config.with_overrides(["train.lr=0.2"])) == "rerun"  # another config
    assert run_status(d, config.with_overrides(["log.every=5"])) == "finished"  # logging is not in the hash


# ---- sweeping with the fake runner --------------------------------------------------------------------


def test_sweep_resumes_reruns_unfinished_and_changed_runs(tmp_path):
    g = grid(seed=[0, 1], attack__name=["none", "sign_flip"])
    out = tmp_path / "sw"
    kw = dict(out=out, progress=False, echo=None, runner=fake_runner, isolate=False)
    first = sweep(g, **kw)
    assert first.ok and len(first.ran) == 4 and not first.skipped
    assert sorted(p.name for p in first.ran) == sorted(d.name for d in out.iterdir() if d.is_dir())
    assert (out / "sweep.yaml").exists()

    again = sweep(g, **kw)  # nothing to do
    assert len(again.skipped) == 4 and not again.ran

    # Simulate a kill midway through one run: its summary is missing, a partial file is left behind.
    killed = out / "attack.name=sign_flip,seed=1"
    (killed / "summary.json").unlink()
    (killed / "partial.tmp").write_text("half")
    # And another finished run was produced by an older config: hash mismatch.
    stale = out / "attack.name=none,seed=0"
    summary = json.loads((stale / "summary.json").read_text())
    (stale / "summary.json").write_text(json.dumps({**summary, "config_hash": "0000"}))
    untouched = (out / "attack.name=none,seed=1" / "ran.txt").read_text()

    resumed = sweep(g, **kw)
    assert sorted(p.name for p in resumed.ran) == sorted([killed.name, stale.name])
    assert len(resumed.skipped) == 2
    assert not (killed / "partial.tmp").exists()  # rerun from scratch
    assert (killed / "summary.json").exists()
    assert (out / "attack.name=none,seed=1" / "ran.txt").read_text() == untouched


def test_overrides_reach_into_variants_and_may_expand():
    g = grid(
        attack=[{"name": "sign_flip", "start": 100}, {"name": "alie", "start": 100, "params": {"z": 1.0}}]
    )
    root, points, selected = plan(g, ["attack.start=[2,3]", "train.steps=5"], out="x", shard=(2, 2))
    assert [p.data["attack"]["start"] for p in points] == [2, 3, 2, 3]
    assert {p.config.train.steps for p in points} == {5}
    assert [p.name for p in points] == [
        "attack.name=sign_flip,attack.start=2",
        "attack.name=sign_flip,attack.start=3",
        "attack.name=alie,attack.params.z=1,attack.start=2",
        "attack.name=alie,attack.params.z=1,attack.start=3",
    ]
    assert [p.index for p in selected] == [1, 3] and root == Path("x")
    assert points[0].config.log.out == str(Path("x") / points[0].name)
    with pytest.raises(ConfigError, match="--shard"):
        plan(g, shard=(3, 2))


def test_sweep_shards_and_overrides_and_dry_run(tmp_path):
    g = grid(seed=[0, 1, 2])
    out = tmp_path / "sw"
    kw = dict(out=out, progress=False, echo=None, runner=fake_runner, isolate=False)
    a = sweep(g, ["attack.name=[none,sign_flip]"], shard="1/2", **kw)
    b = sweep(g, ["attack.name=[none,sign_flip]"], shard="2/2", **kw)
    names = [p.name for p in a.ran] + [p.name for p in b.ran]
    assert len(names) == 6 and len(set(names)) == 6 and a.total == 6
    lines: list[str] = []
    dry = sweep(
        g, ["attack.name=[none,sign_flip]", "seed=[0,1,2,3]"], dry_run=True, out=out, echo=lines.append
    )
    assert not dry.ran and len(dry.skipped) == 6
    assert sum(line.startswith("run ") for line in lines) == 2  # the two new seed=3 points


def test_a_failing_run_is_reported_without_stopping_the_sweep(tmp_path):
    # Through the real process pool (spawn, 2 workers): the fake runner is imported by the workers.
    g = grid(train__lr=[0.05, 0.123, 0.2])
    result = sweep(g, out=tmp_path, jobs=2, progress=False, echo=None, runner=fake_runner)
    assert not result.ok
    assert [p.name for p, _ in result.failed] == ["train.lr=0.123"]
    assert "boom" in result.failed[0][1]
    assert (tmp_path / "train.lr=0.123" / "error.txt").exists()
    assert sorted(p.name for p in result.ran) == ["train.lr=0.05", "train.lr=0.2"]


def test_cli_sweep_exit_code_nonzero_when_a_run_failed(tmp_path, monkeypatch, capsys):
    from byztrain import cli
    from byztrain.experiments import cli as experiments_cli

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid(train__lr=[0.05, 0.123]), sort_keys=False))
    real = experiments_cli.sweep
    monkeypatch.setattr(
        experiments_cli, "sweep", lambda *a, **k: real(*a, **{**k, "runner": fake_runner, "isolate": False})
    )
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "o"), "--jobs", "1", "--no-progress"]) == 1
    assert "1 failed" in capsys.readouterr().out
    # A bad grid point stops everything before it starts, naming the field and the point.
    assert cli.main(["sweep", str(path), "train.steps=[4,0]", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "grid point 3/4" in err
    assert not (tmp_path / "p").exists()


# ---- reports on fake run folders ------------------------------------------------------------------------


def fake_run(
    root: Path,
    *,
    attack: str,
    defense: str,
    seed: int,
    tau: float = 1.0,
    finished: bool = True,
    ban_steps: list[int] | None = None,
    honest_ban: bool = False,
    cclip: bool = False,
) -> Path:
    """A run folder as the runtime writes it: 8 peers, 3 Byzantine, attack from step 4, eval every 2.
    `ban_steps[i]` is when the i-th Byzantine peer is banned; `honest_ban` bans an honest peer at step 8."""
    cfg = Config.from_dict(
        {
            "seed": seed,
            "peers": 8,
            "byzantine": 3,
            "attack": {"name": attack, "start": 4},
            "defense": {"name": defense, "tau": tau},
            "train": {"steps": 10, "eval_every": 2},
        },
        validate=False,
    )
    name = f"attack.name={attack},defense.name={defense},defense.tau={tau:g},seed={seed}"
    d = root / name
    d.mkdir(parents=True)
    cfg.save(d / "config.yaml")
    byz = choose_byzantine(cfg)
    bans = dict(zip(byz, ban_steps or [], strict=False))
    if honest_ban:
        bans[next(p for p in range(1, 8) if p not in byz)] = 8
    last = 6 if not finished else 10
    lines = []
    good = defense != "mean" or attack == "none"
    for step in range(0, last + 1, 2):
        acc = 0.1 + 0.07 * step + 0.01 * seed if good or step < 4 else 0.1
        banned = sorted(p for p, s in bans.items() if s <= step)
        rec = {
            "step": step,
            "train_loss": 2.0 - 0.1 * step,
            "test_accuracy": acc,
            "active_peers": 8 - len(banned),
            "banned": banned,
            "time_s": 0.5 * step,
        }
        if cclip and step > 0:
            rec.update(cclip_iters=3 + step, cclip_clipped=2, cclip_step_norm=0.01 / step)
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + ("\n" if finished else '\n{"step": 8, "trunc'))
    if finished:
        summary = {
            "final_test_accuracy": acc,
            "best_test_accuracy": acc,
            "steps": 10,
            "wall_seconds": 5.0,
            "byzantine_peers": byz,
            "banned": {str(p): s for p, s in bans.items()},
            "honest_banned": sum(1 for p in bans if p not in byz),
            "config_hash": cfg.config_hash(),
        }
        (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def fake_sweep(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        for attack in ("none", "sign_flip"):
            attacked = attack != "none"
            fake_run(root, attack=attack, defense="mean", seed=seed)
            for tau in (1.0, 10.0):
                fake_run(
                    root,
                    attack=attack,
                    defense="btard",
                    tau=tau,
                    seed=seed,
                    cclip=True,
                    ban_steps=[4, 4, 6] if attacked else None,
                    honest_ban=attacked and tau == 10.0 and seed == 0,
                    finished=not (attacked and tau == 10.0 and seed == 1),
                )
    (root / "attack.name=none,defense.name=mean,defense.tau=1,seed=0" / "tb").mkdir()  # not a run
    return root


def test_runs_are_labelled_by_what_varies(fake_sweep):
    runs = rep.load_runs(fake_sweep)
    assert len(runs) == 12
    assert {r.defense for r in runs} == {"mean", "btard (tau=1)", "btard (tau=10)"}
    assert {r.attack for r in runs} == {"none", "sign_flip"}
    assert {r.other for r in runs} == {""}
    assert sum(r.status == "unfinished" for r in runs) == 1
    (unf,) = [r for r in runs if not r.finished]
    assert unf.steps == 6 and unf.byzantine_peers is not None  # from the metrics and the seeded draw


def test_a_key_an_older_run_lacks_reads_as_its_default_and_does_not_split_the_report(tmp_path):
    root = tmp_path / "runs"
    old = fake_run(root, attack="sign_flip", defense="median", seed=0)
    fake_run(root, attack="sign_flip", defense="median", seed=1)
    text = (old / "config.yaml").read_text()
    assert "worker_momentum: 0" in text
    (old / "config.yaml").write_text("\n".join(x for x in text.splitlines() if "worker_momentum" not in x))
    runs = rep.load_runs(root)
    assert [r.other for r in runs] == ["", ""] and [r.flat["train.worker_momentum"] for r in runs] == [0.0, 0.0]
    assert "worker_momentum" not in rep.make_sweep_report(root).report_md.read_text()


def test_report_writes_csv_markdown_and_figures(fake_sweep):
    outputs = rep.make_sweep_report(fake_sweep)
    assert (outputs.runs, outputs.finished, outputs.unfinished, outputs.failed) == (12, 11, 1, 0)
    with open(fake_sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert {
        "run",
        "attack",
        "defense",
        "seed",
        "defense.tau",
        "attack.name",
        "defense.name",
        "finished",
        "final_test_accuracy",
        "best_test_accuracy",
        "byzantine_banned",
        "honest_banned",
        "wall_seconds",
    } <= set(rows[0])
    unf = [r for r in rows if r["finished"] == "false"]
    assert len(unf) == 1 and unf[0]["status"] == "unfinished"
    md = (fake_sweep / "report.md").read_text()
    assert "| attack \\ defense | mean | btard (tau=1) | btard (tau=10) |" in md
    # mean under none: seeds give 0.8 and 0.81 -> 80.5 ± 0.7
    assert "| none | 80.5 ± 0.7 | 80.5 ± 0.7 | 80.5 ± 0.7 |" in md
    assert "| sign_flip | 10.0 ± 0.0 | 80.5 ± 0.7 | 80.0 * |" in md
    assert (
        "Byzantine peers banned 3.0/3 on average (all 3 in 2/2 runs); last Byzantine ban at step 6 ± 0" in md
    )
    assert "**honest peers banned: 1 (seeds 0)**" in md
    assert "unfinished" in md
    names = {p.name for p in outputs.figures}
    assert {"accuracy-none.png", "accuracy-sign_flip.png", "bans.png", "cclip.png"} <= names
    for p in outputs.figures:
        assert p.stat().st_size > 10_000
        assert f"]({p.name})" in md


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


def test_accuracy_figure_labels_and_legend(fake_sweep):
    runs = [r for r in rep.load_runs(fake_sweep) if r.attack == "sign_flip"]
    fig = rep.figure_accuracy(runs)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "training step (optimizer steps)"
    assert ax.get_ylabel() == "test accuracy (%)"
    assert "sign_flip" in ax.get_title() and "mean ± std over 2 seeds" in ax.get_title()
    assert _legend(ax) == ["mean", "btard (tau=1)", "btard (tau=10)", "attack starts (step 4)"]
    assert ax.get_legend().get_title().get_text() == "defense"
    # The attack start is a dashed vertical line at step 4; bands are drawn for the seeds' spread.
    vlines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(vlines) == 1 and list(vlines[0].get_xdata()) == [4, 4]
    assert len(ax.collections) == 3
    clean = rep.figure_accuracy([r for r in rep.load_runs(fake_sweep) if r.attack == "none"])
    assert "attack starts" not in " ".join(_legend(clean.axes[0]))


def test_ban_and_cclip_figures_labels_and_legend(fake_sweep):
    runs = rep.load_runs(fake_sweep)
    by_attack: dict[str, list] = {}
    for r in runs:
        by_attack.setdefault(r.attack, []).append(r)
    fig = rep.figure_bans(by_attack)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["attack: none", "attack: sign_flip"]
    assert fig.get_suptitle().startswith("Ban timeline: active peers vs step")
    for ax in axes:
        assert ax.get_xlabel() == "training step (optimizer steps)"
        assert ax.get_ylabel() == "active peers (count)"
    assert _legend(axes[1]) == [
        "mean",
        "btard (tau=1)",
        "btard (tau=10)",
        "honest peers (5)",
        "attack starts (step 4)",
    ]
    btard1 = [ln for ln in axes[1].get_lines() if ln.get_label() == "btard (tau=1)"][0]
    assert list(btard1.get_ydata())[-1] == 5  # the three attackers are gone

    fig = rep.figure_cclip([r for r in runs if r.defense.startswith("btard")])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["cclip_clipped", "cclip_iters", "cclip_step_norm"]
    assert [ax.get_ylabel() for ax in axes] == [
        "cclip_clipped (inputs clipped)",
        "cclip_iters (iterations)",
        "cclip_step_norm (L2 norm)",
    ]
    assert fig.get_suptitle().startswith("CenteredClip statistics")
    assert _legend(axes[0])[:4] == [
        "none / btard (tau=1)",
        "none / btard (tau=10)",
        "sign_flip / btard (tau=1)",
        "sign_flip / btard (tau=10)",
    ]


def test_report_prints_the_outcome_table_and_where_the_files_are(fake_sweep, capsys):
    from byztrain import cli

    assert rep.terminal_rows(rep.load_runs(fake_sweep)) == [
        ("none", "mean", "80.5% ± 0.7", "no attack", "0", "-"),
        ("none", "btard (tau=1)", "80.5% ± 0.7", "no attack", "0", "-"),
        ("none", "btard (tau=10)", "80.5% ± 0.7", "no attack", "0", "-"),
        ("sign_flip", "mean", "10.0% ± 0.0", "0 of 3", "0", "-"),
        ("sign_flip", "btard (tau=1)", "80.5% ± 0.7", "3 of 3", "0", "step 6"),
        ("sign_flip", "btard (tau=10)", "80.0% *", "3 of 3", "1", "step 6"),  # the finished seed only
    ]
    assert cli.main(["report", str(fake_sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attack     defense         final accuracy  attackers banned  honest banned")
    assert lines[5].split() == ["sign_flip", "btard", "(tau=1)", "80.5%", "±", "0.7", "3", "of", "3", "0", "step", "6"]
    assert f"  {fake_sweep / 'report.md'}" in lines and f"  {fake_sweep / 'bans.png'}" in lines


def test_report_cli_on_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    from byztrain import cli

    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().err


# ---- one real tiny sweep, end to end --------------------------------------------------------------------


def test_real_tiny_sweep_and_report_end_to_end(tmp_path, capsys):
    from byztrain import cli

    g = {
        "peers": 4,
        "byzantine": 1,
        "seed": [0, 1],
        "attack": {"name": "sign_flip", "start": 2},
        "defense": {"name": "mean"},
        "train": {"steps": 4, "eval_every": 4, "batch_size": 16},
        "log": {"tensorboard": False, "every": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(g))
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--jobs", "2", "--out", str(out), "--no-progress"]) == 0
    assert "2 ran, 0 skipped" in capsys.readouterr().out
    for seed in (0, 1):
        summary = json.loads((out / f"seed={seed}" / "summary.json").read_text())
        cfg = Config.load(out / f"seed={seed}" / "config.yaml")
        assert summary["config_hash"] == cfg.config_hash() and summary["steps"] == 4
        assert cfg.seed == seed and cfg.log.out == str(out / f"seed={seed}")
    assert cli.main(["sweep", str(path), "--jobs", "2", "--out", str(out), "--no-progress"]) == 0
    assert "all 2 runs already finished" in capsys.readouterr().out
    assert cli.main(["report", str(out)]) == 0
    assert (out / "results.csv").exists() and (out / "accuracy-sign_flip.png").exists()
    assert "| sign_flip |" in (out / "report.md").read_text()


# ---- the shipped grids ----------------------------------------------------------------------------------

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_and_grid_validates(path, tmp_path):
    _, points, _ = plan(path, out=tmp_path)
    assert points and all(p.config is not None for p in points)


def test_the_demo_grid_is_mean_and_btard_under_no_attack_sign_flip_and_alie(tmp_path):
    _, points, _ = plan(EXPERIMENTS / "demo.yaml", out=tmp_path)
    pairs = {(p.config.attack.name, p.config.defense.name) for p in points}
    assert pairs == {(a, d) for a in ("none", "sign_flip", "alie") for d in ("mean", "btard")}
    assert {(p.config.peers, p.config.byzantine) for p in points} == {(16, 7)}
    assert all(p.config.attack.start < p.config.train.steps for p in points)
