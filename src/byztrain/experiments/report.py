"""`byztrain report DIR`: results.csv, report.md and PNG figures from the run folders below DIR.

DIR may also be one run folder: then the report is that run's curves and ban timeline (run_report.py).
A run folder is any folder holding config.yaml and metrics.jsonl (README.md, *Outputs*); it is *finished* when it
also holds summary.json, *failed* when it holds error.txt (written by `byztrain sweep`), else *unfinished*
(killed or still running: its metrics so far are used and it is marked as such).

Runs are labelled by the config keys that differ between them: `attack.*` keys make the attack label,
`defense.*` keys the defense label (an extra key shows only where it varies among runs of the same name, so
`mean` stays `mean` next to `btard (tau=10)`), `seed` is averaged over, and any other varying key (e.g.
`byzantine`) splits tables and figures. Figure functions return matplotlib Figures so tests can inspect them.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from byztrain.config import Config, yaml_load
from byztrain.experiments import detection
from byztrain.experiments.collapse import collapse_section, terminal_lines
from byztrain.experiments.figures import DPI, new_figure
from byztrain.runtime.trainer import choose_byzantine

# Keys that never label a run: where it logs, thread counts, data locations, the free-text name.
IGNORED_KEYS = ("name", "log.", "runtime.threads", "runtime.timeout_s", "task.data_dir")


# ---- loading -------------------------------------------------------------------------------------------


@dataclass
class RunData:
    path: Path
    rel: str  # folder relative to the report root
    config: dict
    flat: dict[str, Any]
    metrics: list[dict]
    summary: dict | None
    error: str | None
    params: dict[str, Any] = field(default_factory=dict)  # the varying keys (seed included)
    attack: str = ""
    defense: str = ""
    other: str = ""  # label of the other varying keys ("" when none)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def status(self) -> str:
        if self.summary is not None:
            return "finished"
        return "failed" if self.error is not None else "unfinished"

    @property
    def seed(self) -> Any:
        return self.flat.get("seed")

    def series(self, key: str, scale: float = 1.0) -> dict[int, float]:
        out = {}
        for rec in self.metrics:
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in rec:
                out[int(rec["step"])] = float(v) * scale
        return out

    @property
    def final_accuracy(self) -> float | None:
        if self.summary is not None and self.summary.get("final_test_accuracy") is not None:
            return float(self.summary["final_test_accuracy"])
        acc = self.series("test_accuracy")
        return acc[max(acc)] if acc else None

    @property
    def best_accuracy(self) -> float | None:
        if self.summary is not None and self.summary.get("best_test_accuracy") is not None:
            return float(self.summary["best_test_accuracy"])
        acc = self.series("test_accuracy")
        return max(acc.values()) if acc else None

    @property
    def steps(self) -> int | None:
        if self.summary is not None and self.summary.get("steps") is not None:
            return int(self.summary["steps"])
        steps = [int(r["step"]) for r in self.metrics if "step" in r]
        return max(steps) if steps else None

    @property
    def diverged_at(self) -> int | None:
        """The step at which training diverged and the run ended (docs/protocol.md 4.5), else None."""
        step = (self.summary or {}).get("diverged_at")
        return None if step is None else int(step)

    @property
    def wall_seconds(self) -> float | None:
        if self.summary is not None and self.summary.get("wall_seconds") is not None:
            return float(self.summary["wall_seconds"])
        times = [r["time_s"] for r in self.metrics if isinstance(r.get("time_s"), (int, float))]
        return max(times) if times else None

    @property
    def byzantine_peers(self) -> list[int] | None:
        if self.summary is not None and "byzantine_peers" in self.summary:
            return [int(p) for p in self.summary["byzantine_peers"]]
        try:  # unfinished run: the same draw the trainer makes
            return choose_byzantine(Config.from_dict(self.config, validate=False))
        except Exception:  # noqa: BLE001 — an odd config must not break the report
            return None

    @property
    def bans(self) -> dict[int, int]:
        """peer -> step of its ban (summary, else the metrics' cumulative `banned` lists)."""
        if self.summary is not None and isinstance(self.summary.get("banned"), dict):
            return {int(p): int(s) for p, s in self.summary["banned"].items()}
        out: dict[int, int] = {}
        for rec in self.metrics:
            for p in rec.get("banned") or []:
                out.setdefault(int(p), int(rec.get("step", 0)))
        return out

    @property
    def honest_banned(self) -> int | None:
        if self.summary is not None and self.summary.get("honest_banned") is not None:
            return int(self.summary["honest_banned"])
        byz = self.byzantine_peers
        return None if byz is None else sum(1 for p in self.bans if p not in byz)

    @property
    def byzantine_banned(self) -> int | None:
        byz = self.byzantine_peers
        return None if byz is None else sum(1 for p in self.bans if p in byz)

    @property
    def last_byzantine_ban(self) -> int | None:
        byz = self.byzantine_peers
        steps = [s for p, s in self.bans.items() if byz is None or p in byz]
        return max(steps) if steps else None

    @property
    def attack_on(self) -> bool:
        return self.flat.get("attack.name", "none") != "none" and int(self.flat.get("byzantine", 0) or 0) > 0


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values; an empty mapping (e.g. `attack.params: {}`) contributes no key."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the last line of a killed run may be cut
        if isinstance(rec, dict):
            out.append(rec)
    return out


def find_run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml") if (p.parent / "metrics.jsonl").exists())


_DEFAULTS = _flatten(Config().to_dict())


def load_run(path: Path, root: Path) -> RunData:
    """One run folder. A key its config.yaml lacks (written before the key existed) reads as the key's
    default, which is what such a run did: it neither varies nor splits the report."""
    config = yaml_load((path / "config.yaml").read_text()) or {}
    summary = None
    if (path / "summary.json").exists():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except ValueError:
            summary = None
    error = (path / "error.txt").read_text() if (path / "error.txt").exists() else None
    rel = str(path.relative_to(root)) if path != root else path.name
    flat = {**_DEFAULTS, **_flatten(config)}
    return RunData(path, rel, config, flat, _read_jsonl(path / "metrics.jsonl"), summary, error)


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _varying(runs: list[RunData], keys: Iterable[str] | None = None) -> list[str]:
    missing = object()
    keys = sorted({k for r in runs for k in r.flat}) if keys is None else list(keys)
    return [k for k in keys if not _ignored(k) and len({_key(r.flat.get(k, missing)) for r in runs}) > 1]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "+".join(fmt(v) for v in value) if value else "[]"
    return str(value)


def _section_labels(runs: list[RunData], section: str, varying: list[str]) -> None:
    name_key = f"{section}.name"
    by_name: dict[str, list[RunData]] = {}
    for r in runs:
        by_name.setdefault(str(r.flat.get(name_key, "none")), []).append(r)
    for name, group in by_name.items():
        extra = [
            k for k in _varying(group, [k for k in varying if k.startswith(section + ".")]) if k != name_key
        ]
        for r in group:
            parts = [f"{k[len(section) + 1 :]}={fmt(r.flat.get(k))}" for k in extra]
            setattr(r, section, f"{name} ({', '.join(parts)})" if parts else name)


def load_runs(root: str | Path) -> list[RunData]:
    """Every run folder below `root`, labelled (attack, defense, other) by the keys that vary between them."""
    root = Path(root)
    runs = [load_run(p, root) for p in find_run_dirs(root)]
    varying = _varying(runs)
    for r in runs:
        r.params = {k: r.flat.get(k) for k in varying}
    _section_labels(runs, "attack", varying)
    _section_labels(runs, "defense", varying)
    other = [k for k in varying if k != "seed" and not k.startswith(("attack.", "defense."))]
    for r in runs:
        r.other = ", ".join(f"{k}={fmt(r.flat.get(k))}" for k in other)
    return runs


# ---- ordering and grouping -------------------------------------------------------------------------------


def _natural(text: str) -> list:
    return [
        (0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
        for t in re.split(r"(\d+(?:\.\d+)?)", text)
    ]


def attack_order(labels: Iterable[str]) -> list[str]:
    return sorted(set(labels), key=lambda s: (not s.startswith("none"), _natural(s)))


def defense_order(labels: Iterable[str]) -> list[str]:
    return sorted(set(labels), key=lambda s: (not s.startswith("mean"), _natural(s)))


def group_runs(runs: list[RunData]) -> dict[str, dict[str, dict[str, list[RunData]]]]:
    """other -> attack -> defense -> runs (the seeds)."""
    out: dict[str, dict[str, dict[str, list[RunData]]]] = {}
    for r in runs:
        out.setdefault(r.other, {}).setdefault(r.attack, {}).setdefault(r.defense, []).append(r)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _series_stats(runs: list[RunData], key: str, scale: float = 1.0):
    """Steps, mean, std over the runs that logged `key` at each step."""
    per_run = [r.series(key, scale) for r in runs]
    steps = sorted({s for d in per_run for s in d})
    means, stds = [], []
    for s in steps:
        m, sd = mean_std([d[s] for d in per_run if s in d])
        means.append(m)
        stds.append(sd)
    return steps, means, stds


def _colors(labels: list[str]) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _attack_marks(ax, runs: list[RunData], *, label: bool = True) -> None:
    starts = sorted({int(r.flat.get("attack.start", 0) or 0) for r in runs if r.attack_on})
    stops = sorted(
        {int(r.flat["attack.stop"]) for r in runs if r.attack_on and r.flat.get("attack.stop") is not None}
    )
    for s in starts:
        ax.axvline(
            s,
            color="0.3",
            linestyle="--",
            linewidth=1.2,
            label=f"attack starts (step {s})" if label else None,
        )
    for s in stops:
        ax.axvline(
            s, color="0.3", linestyle=":", linewidth=1.2, label=f"attack stops (step {s})" if label else None
        )


def _seeds_text(runs: list[RunData]) -> str:
    n = len({_key(r.seed) for r in runs})
    return f"{n} seed" if n == 1 else f"{n} seeds"


# ---- figures ---------------------------------------------------------------------------------------------


def figure_accuracy(runs: list[RunData], title: str | None = None):
    """Test accuracy (%) vs step for the runs of one attack: one line per defense (mean over seeds) with a
    +-std band, the attack start as a dashed vertical line."""
    by_def: dict[str, list[RunData]] = {}
    for r in runs:
        by_def.setdefault(r.defense, []).append(r)
    labels = defense_order(by_def)
    fig = new_figure((7.5 if len(labels) <= 6 else 9.5, 4.6))
    ax = fig.add_subplot()
    colors = _colors(labels)
    for lab in labels:
        steps, mean, std = _series_stats(by_def[lab], "test_accuracy", 100.0)
        if not steps:
            continue
        ax.plot(steps, mean, marker="o", markersize=3, linewidth=1.8, color=colors[lab], label=lab)
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(steps, lo, hi, color=colors[lab], alpha=0.2, linewidth=0)
    _attack_marks(ax, runs)
    attack = runs[0].attack if runs else ""
    if title is None:
        title = f"Test accuracy under attack: {attack}"
        if runs and runs[0].other:
            title += f" ({runs[0].other})"
    ax.set_title(f"{title}\nmean ± std over {_seeds_text(runs)}", fontsize=11)
    ax.set_xlabel("training step (optimizer steps)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    if len(labels) <= 6:
        ax.legend(title="defense", loc="best", fontsize=9)
    else:  # many defenses: beside the plot, so the curves stay visible
        ax.legend(title="defense", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, ncols=1 + len(labels) // 18)
    return fig


def figure_bans(by_attack: dict[str, list[RunData]], title: str = "Ban timeline: active peers vs step"):
    """Active peers vs step, one panel per attack, one line per defense (mean over seeds)."""
    attacks = attack_order(by_attack)
    ncols = min(3, max(1, len(attacks)))
    nrows = math.ceil(len(attacks) / ncols) if attacks else 1
    fig = new_figure((4.6 * ncols, 3.4 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    all_defs = defense_order(r.defense for rs in by_attack.values() for r in rs)
    colors = _colors(all_defs)
    for i, attack in enumerate(attacks):
        ax = axes[i // ncols][i % ncols]
        runs = by_attack[attack]
        by_def: dict[str, list[RunData]] = {}
        for r in runs:
            by_def.setdefault(r.defense, []).append(r)
        for lab in defense_order(by_def):
            steps, mean, _ = _series_stats(by_def[lab], "active_peers")
            if steps:
                ax.plot(steps, mean, drawstyle="steps-post", linewidth=1.8, color=colors[lab], label=lab)
        honest = {int(r.flat.get("peers", 0)) - int(r.flat.get("byzantine", 0)) for r in runs if r.attack_on}
        for h in sorted(honest):
            ax.axhline(h, color="black", linestyle=":", linewidth=1.2, label=f"honest peers ({h})")
        _attack_marks(ax, runs)
        ax.set_title(f"attack: {attack}", fontsize=10)
        ax.set_xlabel("training step (optimizer steps)")
        ax.set_ylabel("active peers (count)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    for j in range(len(attacks), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.suptitle(title + " (mean over seeds)", fontsize=12)
    return fig


_CCLIP_UNITS = (
    ("unconverged", "partitions not converged"),
    ("iter", "iterations"),
    ("frac", "fraction of inputs"),
    ("clipped", "inputs clipped"),
    ("norm", "L2 norm"),
    ("radius", "L2 norm"),
    ("dist", "L2 norm"),
    ("delta", "L2 norm"),
    ("tau", "L2 norm"),
    ("time", "seconds"),
    ("seconds", "seconds"),
)


def cclip_unit(key: str) -> str:
    for word, unit in _CCLIP_UNITS:
        if word in key:
            return unit
    return "unitless"


def cclip_keys(runs: list[RunData]) -> list[str]:
    return sorted({k for r in runs for rec in r.metrics for k in rec if k.startswith("cclip")})


def figure_cclip(runs: list[RunData], title: str = "CenteredClip statistics"):
    """One panel per `cclip*` metric: its value vs step, one line per (attack, defense) (mean over seeds)."""
    keys = cclip_keys(runs)
    ncols = min(2, max(1, len(keys)))
    nrows = math.ceil(len(keys) / ncols) if keys else 1
    fig = new_figure((6.2 * ncols, 3.8 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    groups: dict[str, list[RunData]] = {}
    for r in runs:
        groups.setdefault(f"{r.attack} / {r.defense}", []).append(r)
    attacks = attack_order(r.attack for r in runs)
    defenses = defense_order(r.defense for r in runs)
    order = sorted(
        groups, key=lambda g: (attacks.index(groups[g][0].attack), defenses.index(groups[g][0].defense))
    )
    colors = _colors(order)
    for i, key in enumerate(keys):
        ax = axes[i // ncols][i % ncols]
        for g in order:
            steps, mean, _ = _series_stats(groups[g], key)
            if steps:
                ax.plot(steps, mean, linewidth=1.5, color=colors[g], label=g)
        _attack_marks(ax, runs)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("training step (optimizer steps)")
        ax.set_ylabel(f"{key} ({cclip_unit(key)})")
        ax.grid(True, alpha=0.3)
        ax.legend(title="attack / defense", fontsize=7, title_fontsize=8, loc="best")
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.suptitle(title + " (mean over seeds)", fontsize=12)
    return fig


# ---- tables ----------------------------------------------------------------------------------------------

RESULT_COLUMNS = (
    "status",
    "finished",
    "final_test_accuracy",
    "best_test_accuracy",
    "steps",
    "diverged_at",
    "byzantine_peers",
    "byzantine_banned",
    "honest_banned",
    "bans",
    "last_byzantine_ban_step",
    "wall_seconds",
    "config_hash",
)


def result_rows(runs: list[RunData]) -> tuple[list[str], list[dict]]:
    params = sorted({k for r in runs for k in r.params})
    header = ["run", "attack", "defense", *params, *RESULT_COLUMNS]
    rows = []
    for r in runs:
        bans = r.bans
        row = {"run": r.rel, "attack": r.attack, "defense": r.defense}
        row.update({k: fmt(r.params.get(k)) for k in params})
        byz = r.byzantine_peers
        row.update(
            status=r.status,
            finished=str(r.finished).lower(),
            final_test_accuracy=_num(r.final_accuracy),
            best_test_accuracy=_num(r.best_accuracy),
            steps=_num(r.steps),
            diverged_at=_num(r.diverged_at),
            byzantine_peers=" ".join(map(str, byz)) if byz is not None else "",
            byzantine_banned=_num(r.byzantine_banned),
            honest_banned=_num(r.honest_banned),
            bans=" ".join(f"{p}@{s}" for p, s in sorted(bans.items(), key=lambda x: (x[1], x[0]))),
            last_byzantine_ban_step=_num(r.last_byzantine_ban),
            wall_seconds=_num(r.wall_seconds),
            config_hash=(r.summary or {}).get("config_hash", ""),
        )
        rows.append(row)
    return header, rows


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_results_csv(runs: list[RunData], path: Path) -> Path:
    header, rows = result_rows(runs)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def accuracy_cell(runs: list[RunData]) -> str:
    done = [r.final_accuracy * 100 for r in runs if r.finished and r.final_accuracy is not None]
    pending = [r for r in runs if not r.finished]
    if not done:
        failed = sum(1 for r in pending if r.status == "failed")
        parts = [f"{n} {s}" for n, s in ((len(pending) - failed, "unfinished"), (failed, "failed")) if n]
        return f"— ({', '.join(parts)})" if pending else "—"
    m, sd = mean_std(done)
    text = f"{m:.1f} ± {sd:.1f}" if len(done) > 1 else f"{m:.1f}"
    diverged = sum(1 for r in runs if r.finished and r.diverged_at is not None)
    if diverged:
        text += " †" if diverged == len(done) else f" †{diverged}"
    return text + (" *" if pending else "")


def accuracy_table(by_attack: dict[str, dict[str, list[RunData]]]) -> list[str]:
    attacks = attack_order(by_attack)
    defenses = defense_order(d for a in by_attack.values() for d in a)
    lines = ["| attack \\ defense | " + " | ".join(defenses) + " |", "|---|" + "---:|" * len(defenses)]
    for a in attacks:
        cells = [accuracy_cell(by_attack[a].get(d, [])) for d in defenses]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def ban_notes(by_attack: dict[str, dict[str, list[RunData]]]) -> list[str]:
    notes = []
    for a in attack_order(by_attack):
        for d in defense_order(by_attack[a]):
            runs = by_attack[a][d]
            any_bans = any(r.bans for r in runs)
            if not any_bans and d.split(" ")[0] != "btard":
                continue
            byz = int(runs[0].flat.get("byzantine", 0) or 0)
            banned = [r.byzantine_banned for r in runs if r.byzantine_banned is not None]
            honest = [r.honest_banned or 0 for r in runs]
            all_banned = sum(1 for b in banned if byz and b == byz)
            text = f"- **{d}** under **{a}**: "
            if not runs[0].attack_on:
                total = [len(r.bans) for r in runs]
                text += (
                    f"no attack; peers banned: {sum(total)}" if sum(total) else "no attack; no peer banned"
                )
            elif byz and banned:
                text += f"Byzantine peers banned {statistics.fmean(banned):.1f}/{byz} on average"
                text += f" (all {byz} in {all_banned}/{len(runs)} runs)"
            else:
                text += "no Byzantine peers" if not byz else "bans unknown"
            last = [s for s in (r.last_byzantine_ban for r in runs) if s is not None]
            if last:
                m, sd = mean_std([float(x) for x in last])
                text += f"; last Byzantine ban at step {m:.0f}" + (f" ± {sd:.0f}" if len(last) > 1 else "")
                if runs[0].attack_on:
                    start = int(runs[0].flat.get("attack.start", 0) or 0)
                    text += f" (attack from step {start})"
            if sum(honest):
                seeds = ", ".join(fmt(r.seed) for r in runs if r.honest_banned)
                text += f"; **honest peers banned: {sum(honest)} (seeds {seeds})**"
            elif runs[0].attack_on or any_bans:
                text += "; honest peers banned: 0"
            unfinished = sum(1 for r in runs if not r.finished)
            if unfinished:
                text += f" ({unfinished} unfinished)"
            notes.append(text + ".")
    return notes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-").lower() or "all"


# ---- worst case over attacks -----------------------------------------------------------------------------


def attacks_only(labels: Iterable[str]) -> list[str]:
    """The attack labels that name an attack: `none` is the clean reference, not an attack to survive."""
    return [a for a in attack_order(labels) if not a.startswith("none")]


def seed_mean_accuracy(runs: list[RunData]) -> float | None:
    """Mean final accuracy (fraction) over the finished runs (seeds), None when none finished."""
    done = [r.final_accuracy for r in runs if r.finished and r.final_accuracy is not None]
    return statistics.fmean(done) if done else None


@dataclass
class WorstCase:
    defense: str
    accuracy: float | None  # min over the attacks of the seed-mean final accuracy (fraction)
    attack: str | None  # the attack that reaches it
    per_attack: dict[str, float | None]  # seed-mean final accuracy per attack (None: no finished run)

    @property
    def complete(self) -> bool:
        return all(v is not None for v in self.per_attack.values())


def worst_cases(by_attack: dict[str, dict[str, list[RunData]]]) -> list[WorstCase]:
    """ByzFL's criterion: per defense configuration, the minimum over the attacks of the seed-mean final
    accuracy, ranked best first (a defense missing an attack's results ranks after the complete ones, its
    minimum being over fewer attacks). Empty when the runs hold fewer than two attacks."""
    attacks = attacks_only(by_attack)
    if len(attacks) < 2:
        return []
    out = []
    for d in defense_order(d for a in attacks for d in by_attack[a]):
        per = {a: seed_mean_accuracy(by_attack[a].get(d, [])) for a in attacks}
        known = {a: v for a, v in per.items() if v is not None}
        worst = min(known, key=lambda a: known[a]) if known else None
        out.append(WorstCase(d, known[worst] if worst else None, worst, per))
    return sorted(out, key=lambda w: (w.accuracy is None, not w.complete, -(w.accuracy or 0.0)))


def _ranks(ranked: list[WorstCase]) -> list[int]:
    """Competition ranks (1, 2, 2, 4): defenses whose worst case prints the same share a rank."""
    keys = [(w.complete, None if w.accuracy is None else round(100 * w.accuracy, 1)) for w in ranked]
    return [keys.index(k) + 1 for k in keys]


def _worst_text(w: WorstCase) -> str:
    if w.accuracy is None:
        return "—"
    return f"{100 * w.accuracy:.1f}" + ("" if w.complete else " *")


def worst_case_table(by_attack: dict[str, dict[str, list[RunData]]]) -> list[str]:
    """Markdown: defenses ranked by worst-case accuracy, with the accuracy under each attack (and `none`)."""
    ranked = worst_cases(by_attack)
    if not ranked:
        return []
    attacks = attack_order(by_attack)
    lines = [
        "| rank | defense | worst case (%) | worst attack | " + " | ".join(attacks) + " |",
        "|---:|---|---:|---|" + "---:|" * len(attacks),
    ]
    for i, w in zip(_ranks(ranked), ranked, strict=True):
        cells = [accuracy_cell(by_attack[a].get(w.defense, [])) for a in attacks]
        lines.append(
            f"| {i} | {w.defense} | {_worst_text(w)} | {w.attack or '—'} | " + " | ".join(cells) + " |"
        )
    return lines


def worst_case_rows(runs: list[RunData]) -> list[tuple[str, ...]]:
    """The terminal form: (group, rank, defense, worst case, worst attack) for every group with >1 attack."""
    rows = []
    for other, by_attack in sorted(group_runs(runs).items(), key=lambda kv: _natural(kv[0])):
        ranked = worst_cases(by_attack)
        for i, w in zip(_ranks(ranked), ranked, strict=True):
            text = "-" if w.accuracy is None else f"{100 * w.accuracy:.1f}%" + ("" if w.complete else " *")
            rows.append((other or "all", str(i), w.defense, text, w.attack or "-"))
    return rows


WORST_CASE_HEADER = ("runs", "rank", "defense", "worst case", "worst attack")
WORST_CASE_NOTE = (
    "Worst case over attacks (ByzFL's criterion): per defense, the minimum over the attacks (not `none`) "
    "of the final test accuracy averaged over seeds; best first. `*`: some attack has no finished run, "
    "so the minimum is over the others."
)


# ---- heatmap: Byzantine peers x heterogeneity ----------------------------------------------------------------

HETEROGENEITY = {
    "task.alpha": "Dirichlet concentration α (task.alpha; smaller: more label skew)",
    "task.gamma": "iid share γ (task.gamma; 0: sorted by label, 1: iid)",
}


def heatmap_key(runs: list[RunData]) -> str | None:
    """The heterogeneity key when the runs vary both `byzantine` and it, else None."""
    varying = {k for r in runs for k in r.params}
    if "byzantine" not in varying:
        return None
    return next((k for k in HETEROGENEITY if k in varying), None)


def heatmap_groups(runs: list[RunData]) -> dict[str, list[RunData]]:
    """One heatmap per value of the varying keys other than f, heterogeneity, seed, attack and defense."""
    het = heatmap_key(runs)
    if het is None:
        return {}
    rest = sorted(
        {k for r in runs for k in r.params}
        - {"seed", "byzantine", het}
        - {k for r in runs for k in r.params if k.startswith(("attack.", "defense."))}
    )
    out: dict[str, list[RunData]] = {}
    for r in runs:
        out.setdefault(", ".join(f"{k}={fmt(r.flat.get(k))}" for k in rest), []).append(r)
    return out


def _sort_values(values: Iterable[Any]) -> list[Any]:
    return sorted(
        set(values),
        key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v)),
    )


def heatmap_cells(runs: list[RunData], het: str) -> dict[str, dict[tuple[Any, Any], float]]:
    """defense -> (f, heterogeneity) -> final test accuracy (%): the seed mean, the worst case over the attacks
    when there are several (`none` counts only where it is the sole attack). A cell with an attack lacking a
    finished run is left out."""
    cells: dict[tuple[str, Any, Any], dict[str, list[RunData]]] = {}
    for r in runs:
        key = (r.defense, r.flat.get("byzantine"), r.flat.get(het))
        cells.setdefault(key, {}).setdefault(r.attack, []).append(r)
    out: dict[str, dict[tuple[Any, Any], float]] = {}
    for (d, f, h), by_attack in cells.items():
        values = [seed_mean_accuracy(by_attack[a]) for a in attacks_only(by_attack) or list(by_attack)]
        if values and all(v is not None for v in values):
            out.setdefault(d, {})[(f, h)] = 100 * min(values)
    return out


def _heat_panel(ax, grid, fs, hs, het, title, **imshow):
    im = ax.imshow(grid, origin="lower", aspect="auto", **imshow)
    ax.set_xticks(range(len(hs)), [fmt(h) for h in hs])
    ax.set_yticks(range(len(fs)), [fmt(f) for f in fs])
    ax.set_xlabel(HETEROGENEITY[het], fontsize=8)
    ax.set_ylabel("Byzantine peers f (count)")
    ax.set_title(title, fontsize=10)
    return im


def _cell_text(ax, i, j, text, value) -> None:
    color = "white" if value < 60 else "black"  # viridis is dark below ~60%
    ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)


def figure_heatmap(runs: list[RunData], title: str | None = None):
    """Final test accuracy (%) per (Byzantine peers f, heterogeneity) cell: one panel per defense (the worst
    case over the attacks when several) and a last panel naming the best defense of each cell. Raises
    ValueError when the runs do not vary both `byzantine` and `task.alpha`/`task.gamma`."""
    het = heatmap_key(runs)
    if het is None:
        raise ValueError(
            "a heatmap needs runs that vary both `byzantine` and one of "
            + ", ".join(f"`{k}`" for k in HETEROGENEITY)
        )
    cells = heatmap_cells(runs, het)
    defenses = defense_order(cells)
    fs = _sort_values(r.flat.get("byzantine") for r in runs)
    hs = _sort_values(r.flat.get(het) for r in runs)
    ncols = min(4, len(defenses) + 1)
    nrows = math.ceil((len(defenses) + 1) / ncols)
    fig = new_figure((3.6 * ncols + 1.0, 3.0 * nrows + 0.9))
    axes = [ax for row in fig.subplots(nrows, ncols, squeeze=False) for ax in row]
    im = None
    grids = {}
    for ax, d in zip(axes, defenses, strict=False):
        grid = np.full((len(fs), len(hs)), np.nan)
        for (f, h), v in cells[d].items():
            grid[fs.index(f), hs.index(h)] = v
        grids[d] = grid
        im = _heat_panel(ax, grid, fs, hs, het, d, cmap="viridis", vmin=0, vmax=100)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                _cell_text(ax, i, j, f"{v:.1f}", v)
    _best_panel(axes[len(defenses)], grids, defenses, fs, hs, het)
    for ax in axes[len(defenses) + 1 :]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axes[: len(defenses)], label="final test accuracy (%)", shrink=0.9)
    attacks = attacks_only(r.attack for r in runs)
    how = (
        "worst case over attacks: " + ", ".join(attacks)
        if len(attacks) > 1
        else f"attack: {attacks[0]}"
        if attacks
        else "no attack"
    )
    fig.suptitle(
        (title or "Final test accuracy (%) by Byzantine peers f and heterogeneity")
        + f"\n{how}; mean over {_seeds_text(runs)}",
        fontsize=11,
    )
    return fig


def _best_panel(ax, grids, defenses, fs, hs, het) -> None:
    """Each cell coloured by its best defense (ties at 0.1 points: all named), its accuracy written in."""
    colors = _colors(defenses)
    index = np.full((len(fs), len(hs)), np.nan)
    for i in range(len(fs)):
        for j in range(len(hs)):
            vals = {d: g[i, j] for d, g in grids.items() if not np.isnan(g[i, j])}
            if not vals:
                continue
            top = max(vals.values())
            best = [d for d in defenses if d in vals and round(vals[d], 1) == round(top, 1)]
            index[i, j] = defenses.index(best[0])
            ax.text(j, i, "\n".join([*best, f"{top:.1f}%"]), ha="center", va="center", fontsize=7)
    cmap = ListedColormap([colors[d] for d in defenses] or ["white"])
    _heat_panel(
        ax,
        index,
        fs,
        hs,
        het,
        "best defense per cell",
        cmap=cmap,
        vmin=-0.5,
        vmax=max(len(defenses), 1) - 0.5,
        alpha=0.55,
    )
    used = sorted({int(v) for v in index.flat if not np.isnan(v)})
    handles = [Patch(color=colors[defenses[k]], alpha=0.55, label=defenses[k]) for k in used]
    if handles:
        ax.legend(
            handles=handles,
            title="best defense",
            fontsize=7,
            title_fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.22),  # below the axis label: beside it, it would widen the column
            ncols=min(3, len(handles)),
        )


def heatmap_table(runs: list[RunData]) -> list[str]:
    """Markdown of the heatmap's numbers: one row per defense, one column per (f, heterogeneity) cell."""
    het = heatmap_key(runs)
    if het is None:
        return []
    cells = heatmap_cells(runs, het)
    keys = [
        (f, h)
        for f in _sort_values(r.flat.get("byzantine") for r in runs)
        for h in _sort_values(r.flat.get(het) for r in runs)
    ]
    short = het.split(".")[-1]
    lines = [
        "| defense | " + " | ".join(f"f={fmt(f)}, {short}={fmt(h)}" for f, h in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for d in defense_order(cells):
        vals = [cells[d].get(k) for k in keys]
        lines.append(f"| {d} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in vals) + " |")
    return lines


# ---- the report ------------------------------------------------------------------------------------------


@dataclass
class ReportOutputs:
    results_csv: Path
    report_md: Path
    figures: list[Path]
    runs: int
    finished: int
    unfinished: int
    failed: int
    table: list[str] = field(default_factory=list)  # what `byztrain report` prints: the outcome at a glance

    @property
    def files(self) -> list[Path]:
        return [self.results_csv, self.report_md, *self.figures]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _heatmap_section(runs: list[RunData], out: Path) -> tuple[list[str], list[Path]]:
    """report.md lines and figures of the f x heterogeneity heatmaps (none unless the grid varies both)."""
    md: list[str] = []
    figures: list[Path] = []
    for rest, group in sorted(heatmap_groups(runs).items(), key=lambda kv: _natural(kv[0])):
        heading = f" — {rest}" if rest else ""
        suffix = f"--{_slug(rest)}" if rest else ""
        path = _save(figure_heatmap(group), out / f"heatmap{suffix}.png")
        figures.append(path)
        md += [f"## Final test accuracy (%) by Byzantine peers and heterogeneity{heading}", ""]
        md += [
            "Seed mean of the final test accuracy; with several attacks, the worst case over them "
            "(`none` excluded). A cell is empty (—) when some attack has no finished run.",
            "",
            *heatmap_table(group),
            "",
            f"![final accuracy by f and heterogeneity]({path.name})",
            "",
        ]
    return md, figures


def _group_section(other: str, by_attack: dict, out: Path) -> tuple[list[str], list[Path]]:
    """report.md's section for one value of the grid's other varying keys: accuracy, worst case, bans, figures."""
    md: list[str] = []
    figures: list[Path] = []
    suffix = f"--{_slug(other)}" if other else ""
    heading = f" — {other}" if other else ""
    all_runs = [r for a in by_attack.values() for rs in a.values() for r in rs]
    md += [f"## Final test accuracy (%){heading}", ""]
    md.append(
        f"Mean ± sample std over seeds ({_seeds_text(all_runs)}), finished runs only; "
        "`*`: some seeds unfinished or failed."
    )
    if any(r.diverged_at is not None for r in all_runs):
        md[-1] += " " + DIVERGED_NOTE
    md += ["", *accuracy_table(by_attack), ""]
    worst = worst_case_table(by_attack)
    if worst:
        md += [f"### Worst case over attacks{heading}", "", WORST_CASE_NOTE, "", *worst, ""]
    md += [f"### Bans{heading}", ""]
    notes = ban_notes(by_attack)
    md += notes if notes else ["No peer was banned in any run."]
    md.append("")
    md += [f"### Figures{heading}", ""]
    for attack in attack_order(by_attack):
        runs_a = [r for rs in by_attack[attack].values() for r in rs]
        path = _save(figure_accuracy(runs_a), out / f"accuracy-{_slug(attack)}{suffix}.png")
        figures.append(path)
        md.append(f"![test accuracy under {attack}]({path.name})")
    flat_by_attack = {a: [r for rs in d.values() for r in rs] for a, d in by_attack.items()}
    if any(any("active_peers" in rec for rec in r.metrics) for r in all_runs):
        title = "Ban timeline: active peers vs step" + (f" ({other})" if other else "")
        path = _save(figure_bans(flat_by_attack, title), out / f"bans{suffix}.png")
        figures.append(path)
        md.append(f"![ban timeline]({path.name})")
    cclip_runs = [r for r in all_runs if any(k.startswith("cclip") for rec in r.metrics for k in rec)]
    if cclip_runs:
        title = "CenteredClip statistics" + (f" ({other})" if other else "")
        path = _save(figure_cclip(cclip_runs, title), out / f"cclip{suffix}.png")
        figures.append(path)
        md.append(f"![CenteredClip statistics]({path.name})")
    md.append("")
    return md, figures


DIVERGED_NOTE = (
    "`†`: training diverged in every seed (`†k`: in k of them) and the run ended there; its final "
    "accuracy is the evaluation at that step (the runs are listed at the end)."
)


def _diverged_section(runs: list[RunData]) -> list[str]:
    diverged = [r for r in runs if r.finished and r.diverged_at is not None]
    if not diverged:
        return []
    md = ["## Diverged runs", "", "An honest peer's own gradient turned non-finite: the run ended at that step."]
    md.append("")
    for r in sorted(diverged, key=lambda r: _natural(r.rel)):
        acc = "—" if r.final_accuracy is None else f"{100 * r.final_accuracy:.1f} %"
        md.append(f"- `{r.rel}`: diverged at step {r.diverged_at}, final accuracy {acc}")
    md.append("")
    return md


def _problems_section(runs: list[RunData]) -> list[str]:
    problems = [r for r in runs if r.status != "finished"]
    if not problems:
        return []
    md = ["## Unfinished and failed runs", ""]
    for r in problems:
        line = f"- `{r.rel}`: {r.status}, last logged step {r.steps}"
        if r.error:
            last = [x for x in r.error.strip().splitlines() if x.strip()]
            line += f" — {last[-1].strip() if last else 'error'} (see error.txt)"
        md.append(line)
    md.append("")
    return md


def make_sweep_report(root: str | Path, out: str | Path | None = None) -> ReportOutputs:
    """The report of a sweep folder (`byztrain report` on a single run folder is run_report's)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(
            f"no run folders below {root} (a run folder holds config.yaml and metrics.jsonl); "
            "run `byztrain sweep GRID.yaml --out DIR` first"
        )
    results = write_results_csv(runs, out / "results.csv")
    grouped = group_runs(runs)
    figures: list[Path] = []
    md = ["# byztrain report", "", f"Runs below `{root}`: {len(runs)} — "]
    counts = {s: sum(1 for r in runs if r.status == s) for s in ("finished", "unfinished", "failed")}
    md[-1] += ", ".join(f"{n} {s}" for s, n in counts.items())
    walls = [r.wall_seconds for r in runs if r.finished and r.wall_seconds is not None]
    if walls:
        md[-1] += (
            f"; total run wall time {sum(walls) / 60:.1f} min ({statistics.fmean(walls):.0f} s per run)."
        )
    md += ["", "Per-run numbers: [results.csv](results.csv).", ""]
    for other in sorted(grouped, key=_natural):
        group_md, group_figs = _group_section(other, grouped[other], out)
        md, figures = md + group_md, figures + group_figs
    heat_md, heat_figs = _heatmap_section(runs, out)
    md += heat_md
    figures += heat_figs
    md += collapse_section(runs)  # collapse rate per cell over seeds
    if detection.is_detection_grid(runs):
        lines, paths = detection.detection_report(runs, out)
        md, figures = md + lines, figures + paths
    md += _diverged_section(runs) + _problems_section(runs)
    report = out / "report.md"
    report.write_text("\n".join(md))
    table = format_table(TERMINAL_HEADER, terminal_rows(runs))
    worst_rows = worst_case_rows(runs)
    if worst_rows:
        table += [
            "",
            "worst case over attacks (min over attacks of the seed-mean final accuracy), best first:",
        ]
        table += format_table(WORST_CASE_HEADER, worst_rows)
    table += terminal_lines(runs)
    return ReportOutputs(
        results, report, figures, len(runs), counts["finished"], counts["unfinished"], counts["failed"], table
    )


# ---- the terminal summary of `byztrain report` -------------------------------------------------------------

TERMINAL_HEADER = (
    "attack",
    "defense",
    "final accuracy",
    "attackers banned",
    "honest banned",
    "last attacker banned",
)


def terminal_rows(runs: list[RunData]) -> list[tuple[str, ...]]:
    """One row per (attack, defense), seeds averaged: what `byztrain report` prints (and `make demo` ends with).
    Without an attack every peer behaves honestly, so any ban counts as an honest peer banned."""
    rows = []
    for other, by_attack in sorted(group_runs(runs).items(), key=lambda kv: _natural(kv[0])):
        for a in attack_order(by_attack):
            for d in defense_order(by_attack[a]):
                group = [r for r in by_attack[a][d] if r.finished] or by_attack[a][d]
                label = f"{a} ({other})" if other else a
                rows.append((label, d, _accuracy_text(by_attack[a][d]), *_ban_texts(group)))
    return rows


def _accuracy_text(runs: list[RunData]) -> str:
    done = [100 * r.final_accuracy for r in runs if r.finished and r.final_accuracy is not None]
    if not done:
        return "failed" if all(r.status == "failed" for r in runs) else "unfinished"
    m, sd = mean_std(done)
    text = f"{m:.1f}%" + (f" ± {sd:.1f}" if len(done) > 1 else "")
    return text + (" *" if len(done) < len(runs) else "")


def _mean_text(values: list[float]) -> str:
    m = statistics.fmean(values)
    return f"{m:.0f}" if m == int(m) else f"{m:.1f}"


def _ban_texts(runs: list[RunData]) -> tuple[str, str, str]:
    if not runs[0].attack_on:
        return "no attack", _mean_text([len(r.bans) for r in runs]), "-"
    byz = int(runs[0].flat.get("byzantine", 0) or 0)
    caught = [r.byzantine_banned or 0 for r in runs]
    honest = _mean_text([r.honest_banned or 0 for r in runs])
    if not all(c == byz for c in caught):
        return f"{_mean_text(caught)} of {byz}", honest, "-" if not any(caught) else "not all"
    return f"{byz} of {byz}", honest, "step " + _mean_text([r.last_byzantine_ban for r in runs])


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
