"""`byztrain report`: the worst case over attacks (ranking of defenses) and the f x heterogeneity heatmap,
on fake run folders whose final accuracies are a known function of the run's settings."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from byztrain.config import Config
from byztrain.experiments import report as rep


def run_folder(root: Path, acc: float, *, finished: bool = True, **settings) -> Path:
    """A run folder with final test accuracy `acc`; `settings` are dotted keys (attack.name=..., seed=...)."""
    data: dict = {"peers": 16, "byzantine": 3, "train": {"steps": 10, "eval_every": 10}}
    for key, value in settings.items():
        node = data
        *head, last = key.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = value
    cfg = Config.from_dict(data, validate=False)
    d = root / ",".join(f"{k.replace('__', '.')}={v}" for k, v in sorted(settings.items()))
    d.mkdir(parents=True)
    cfg.save(d / "config.yaml")
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "test_accuracy": acc}) + "\n")
    if finished:
        summary = {"final_test_accuracy": acc, "steps": 10, "wall_seconds": 1.0, "byzantine_peers": [1, 2, 3]}
        (d / "summary.json").write_text(json.dumps(summary))
    return d


# defense -> attack -> final accuracy of seed 0 (seed s adds 0.02 s). btard is lower without the attack than
# under it, so a worst case that wrongly counted `none` would differ.
ACC = {
    "mean": {"none": 0.90, "sign_flip": 0.10, "alie": 0.30},
    "median": {"none": 0.88, "sign_flip": 0.60, "alie": 0.40},
    "btard": {"none": 0.80, "sign_flip": 0.86, "alie": 0.84},
}
SEEDS = (0, 1)


def seed_mean(defense: str, attack: str) -> float:
    return statistics.fmean(ACC[defense][attack] + 0.02 * s for s in SEEDS)


@pytest.fixture
def attack_grid(tmp_path) -> Path:
    root = tmp_path / "runs"
    for d, by_attack in ACC.items():
        for a, acc in by_attack.items():
            for s in SEEDS:
                run_folder(root, acc + 0.02 * s, attack__name=a, defense__name=d, seed=s)
    return root


def test_worst_case_is_the_min_over_attacks_of_the_seed_mean_ranked_best_first(attack_grid):
    (by_attack,) = rep.group_runs(rep.load_runs(attack_grid)).values()
    ranked = rep.worst_cases(by_attack)
    expected = {
        d: min((seed_mean(d, a), a) for a in ("sign_flip", "alie")) for d in ACC
    }  # `none` is no attack
    assert [w.defense for w in ranked] == sorted(ACC, key=lambda d: -expected[d][0])
    for w in ranked:
        assert w.accuracy == pytest.approx(expected[w.defense][0])
        assert w.attack == expected[w.defense][1]
        assert w.complete and set(w.per_attack) == {"sign_flip", "alie"}


def test_report_md_and_terminal_show_the_ranking(attack_grid, capsys):
    from byztrain import cli

    rep.make_sweep_report(attack_grid)
    md = (attack_grid / "report.md").read_text()
    assert "### Worst case over attacks" in md
    header = "| rank | defense | worst case (%) | worst attack | none | alie | sign_flip |"
    lines = md.splitlines()
    start = lines.index(header)
    rows = [line.split(" | ") for line in lines[start + 2 : start + 5]]
    assert [r[1] for r in rows] == ["btard", "median", "mean"]
    assert rows[0][2] == f"{100 * seed_mean('btard', 'alie'):.1f}" and rows[0][3] == "alie"
    assert cli.main(["report", str(attack_grid)]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("worst case over attacks (min over attacks of the seed-mean final accuracy), best first:")
    assert out[i + 1].split() == ["runs", "rank", "defense", "worst", "case", "worst", "attack"]
    assert out[i + 2].split() == ["all", "1", "btard", f"{100 * seed_mean('btard', 'alie'):.1f}%", "alie"]
    assert [line.split()[2] for line in out[i + 2 : i + 5]] == ["btard", "median", "mean"]


def test_no_worst_case_with_a_single_attack(tmp_path, capsys):
    from byztrain import cli

    root = tmp_path / "runs"
    for d in ("mean", "median"):
        for a in ("none", "sign_flip"):
            run_folder(root, ACC[d][a], attack__name=a, defense__name=d)
    (by_attack,) = rep.group_runs(rep.load_runs(root)).values()
    assert rep.worst_cases(by_attack) == [] and rep.worst_case_table(by_attack) == []
    assert cli.main(["report", str(root)]) == 0
    assert "worst case" not in capsys.readouterr().out
    assert "Worst case" not in (root / "report.md").read_text()


def test_a_defense_missing_an_attack_is_marked_and_ranked_after_the_complete_ones(tmp_path):
    root = tmp_path / "runs"
    for a in ("sign_flip", "alie"):
        run_folder(root, ACC["mean"][a], attack__name=a, defense__name="mean")
    run_folder(root, 0.95, attack__name="sign_flip", defense__name="btard")
    run_folder(root, 0.99, attack__name="alie", defense__name="btard", finished=False)  # killed
    (by_attack,) = rep.group_runs(rep.load_runs(root)).values()
    ranked = rep.worst_cases(by_attack)
    assert [(w.defense, w.complete) for w in ranked] == [("mean", True), ("btard", False)]
    assert ranked[1].accuracy == pytest.approx(0.95) and ranked[1].per_attack["alie"] is None
    assert "| 2 | btard | 95.0 * | sign_flip |" in "\n".join(rep.worst_case_table(by_attack))
    assert rep.worst_case_rows(rep.load_runs(root))[1] == ("all", "2", "btard", "95.0% *", "sign_flip")


def test_equal_worst_cases_share_a_rank(tmp_path):
    root = tmp_path / "runs"
    for d, accs in {
        "mean": (0.1, 0.1),
        "median": (0.5, 0.1),
        "btard": (0.8, 0.7),
        "krum": (0.1, 0.3),
    }.items():
        for a, acc in zip(("sign_flip", "alie"), accs, strict=True):
            run_folder(root, acc, attack__name=a, defense__name=d)
    rows = rep.worst_case_rows(rep.load_runs(root))
    assert [(r[1], r[2]) for r in rows] == [("1", "btard"), ("2", "mean"), ("2", "krum"), ("2", "median")]


def test_a_cell_whose_runs_all_failed_reads_failed_on_the_terminal(tmp_path):
    root = tmp_path / "runs"
    run_folder(root, 0.9, attack__name="alie", defense__name="mean")
    failed = run_folder(root, 0.1, attack__name="alie", defense__name="median", finished=False)
    (failed / "error.txt").write_text("ValueError: median: x contains NaN\n")
    run_folder(root, 0.1, attack__name="alie", defense__name="btard", finished=False)  # killed
    runs = rep.load_runs(root)
    rows = {r[1]: r[2] for r in rep.terminal_rows(runs)}
    assert rows == {"mean": "90.0%", "median": "failed", "btard": "unfinished"}
    (by_attack,) = rep.group_runs(runs).values()
    assert rep.accuracy_table(by_attack)[2] == "| alie | 90.0 | — (1 unfinished) | — (1 failed) |"



def test_diverged_runs_are_marked_in_the_tables_the_csv_and_their_own_section(tmp_path):
    # A diverged run is finished (its summary holds the last evaluation), so without a mark its 10 % reads
    # like a trained model's 10 %.
    root = tmp_path / "runs"
    for s, diverged in ((0, 57), (1, None)):
        d = run_folder(root, 0.1, attack__name="alie", defense__name="mean", seed=s)
        summary = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**summary, "diverged_at": diverged}))
    d = run_folder(root, 0.2, attack__name="alie", defense__name="median", seed=0)
    summary = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**summary, "diverged_at": 9}))
    run_folder(root, 0.8, attack__name="alie", defense__name="btard", seed=0)
    runs = rep.load_runs(root)
    (by_attack,) = rep.group_runs(runs).values()
    assert rep.accuracy_table(by_attack)[2] == "| alie | 10.0 ± 0.0 †1 | 80.0 | 20.0 † |"  # mean, btard, median
    outputs = rep.make_sweep_report(root)
    text = outputs.report_md.read_text()
    assert rep.DIVERGED_NOTE in text
    assert "## Diverged runs" in text and "seed=0`: diverged at step 57, final accuracy 10.0 %" in text
    rows = list(csv.DictReader(open(outputs.results_csv)))
    assert sorted(r["diverged_at"] for r in rows) == ["", "", "57", "9"]

# ---- heatmap ----------------------------------------------------------------------------------------------

BASE_ACC = {"mean": 0.5, "median": 0.7, "btard": 0.8}


def heat_acc(defense: str, attack: str, f: int, het: float) -> float:
    """Accuracy falls with f (twice as fast under alie for median, so the worst attack varies by defense) and
    rises with the iid share; btard loses its lead at f=5, so the best defense varies by cell."""
    slope = 0.06 if attack == "alie" and defense == "median" else 0.03
    penalty = 0.35 if defense == "btard" and f == 5 else 0.0
    return BASE_ACC[defense] - slope * f + 0.1 * het - penalty


@pytest.fixture
def heat_grid(tmp_path) -> Path:
    root = tmp_path / "runs"
    for d in BASE_ACC:
        for a in ("sign_flip", "alie"):
            for f in (1, 5):
                for g in (0.0, 0.5, 1.0):
                    run_folder(
                        root,
                        heat_acc(d, a, f, g),
                        attack__name=a,
                        defense__name=d,
                        byzantine=f,
                        task__split="gamma_similarity",
                        task__gamma=g,
                    )
    return root


def test_heatmap_cells_are_the_worst_case_per_f_and_heterogeneity(heat_grid):
    runs = rep.load_runs(heat_grid)
    assert rep.heatmap_key(runs) == "task.gamma"
    cells = rep.heatmap_cells(runs, "task.gamma")
    assert set(cells) == set(BASE_ACC)
    for d, grid in cells.items():
        assert set(grid) == {(f, g) for f in (1, 5) for g in (0.0, 0.5, 1.0)}
        for (f, g), v in grid.items():
            assert v == pytest.approx(100 * min(heat_acc(d, a, f, g) for a in ("sign_flip", "alie")))


def test_heatmap_figure_panels_labels_colour_bar_and_cell_values(heat_grid):
    runs = rep.load_runs(heat_grid)
    fig = rep.figure_heatmap(runs)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["mean", "btard", "median", "best defense per cell"]
    for ax in panels:
        assert ax.get_ylabel() == "Byzantine peers f (count)"
        assert ax.get_xlabel().startswith("iid share γ (task.gamma")
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.5", "1"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "5"]
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "final test accuracy (%)"]
    assert len(colorbars) == 1
    assert "worst case over attacks: alie, sign_flip" in fig.get_suptitle()
    # Cell (f=5, gamma=0.5) of median: the text is written at column 1, row 1.
    median = panels[2]
    texts = {(t.get_position(), t.get_text()) for t in median.texts}
    expected = 100 * min(heat_acc("median", a, 5, 0.5) for a in ("sign_flip", "alie"))
    assert ((1, 1), f"{expected:.1f}") in texts
    # Best defense: btard at f=1, median at f=5 (btard's penalty).
    best = {t.get_position(): t.get_text().splitlines()[0] for t in panels[3].texts}
    assert all(best[(j, 0)] == "btard" for j in range(3)) and all(best[(j, 1)] == "median" for j in range(3))
    assert [t.get_text() for t in panels[3].get_legend().get_texts()] == ["btard", "median"]


def test_report_saves_and_links_the_heatmap_and_its_table(heat_grid):
    outputs = rep.make_sweep_report(heat_grid)
    path = heat_grid / "heatmap.png"
    assert path in outputs.figures and path.stat().st_size > 10_000
    md = (heat_grid / "report.md").read_text()
    assert "](heatmap.png)" in md
    assert "| defense | f=1, gamma=0 | f=1, gamma=0.5 | f=1, gamma=1 | f=5, gamma=0 |" in md
    row = [line for line in md.splitlines() if line.startswith("| mean | ") and "gamma" not in line][-1]
    assert (
        row.split(" | ")[1] == f"{100 * min(heat_acc('mean', a, 1, 0.0) for a in ('sign_flip', 'alie')):.1f}"
    )


def test_one_heatmap_per_value_of_another_varying_key(tmp_path):
    root = tmp_path / "runs"
    for lr in (0.01, 0.1):
        for f in (1, 3):
            for alpha in (0.1, 1.0):
                run_folder(
                    root, 0.5, attack__name="alie", defense__name="mean", byzantine=f,
                    task__split="dirichlet", task__alpha=alpha, train__lr=lr,
                )  # fmt: skip
    outputs = rep.make_sweep_report(root)
    names = sorted(p.name for p in outputs.figures if p.name.startswith("heatmap"))
    assert names == ["heatmap--train.lr=0.01.png", "heatmap--train.lr=0.1.png"]
    fig = rep.figure_heatmap(rep.load_runs(root))
    assert fig.axes[0].get_xlabel().startswith("Dirichlet concentration α")
    assert "attack: alie" in fig.get_suptitle()


def test_no_heatmap_unless_both_f_and_heterogeneity_vary(tmp_path):
    root = tmp_path / "runs"
    for f in (1, 3):
        run_folder(root, 0.5, attack__name="alie", defense__name="mean", byzantine=f)
    runs = rep.load_runs(root)
    assert rep.heatmap_key(runs) is None and rep.heatmap_groups(runs) == {}
    with pytest.raises(ValueError, match="`byzantine` and one of `task.alpha`, `task.gamma`"):
        rep.figure_heatmap(runs)
    outputs = rep.make_sweep_report(root)
    assert not any(p.name.startswith("heatmap") for p in outputs.figures)
    assert not list(root.glob("heatmap*.png")) and "heterogeneity" not in (root / "report.md").read_text()
