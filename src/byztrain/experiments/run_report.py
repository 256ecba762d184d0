"""`byztrain report RUN_FOLDER`: one run's curves and ban timeline, as report.md and PNG figures.

The figures (test accuracy, honest training loss, active peers, CenteredClip iterations where the defense
logs them, and the ban timeline) are returned by `run_figures` as matplotlib Figures, so a notebook can
draw them inline without writing files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from byztrain.experiments.figures import new_figure
from byztrain.experiments.report import (
    ReportOutputs,
    RunData,
    _attack_marks,
    _read_jsonl,
    _save,
    load_run,
    make_sweep_report,
    write_results_csv,
)

# CenteredClip iteration counts, by the defense that logs them: BTARD's per-partition clip, cclip_ps's server.
CCLIP_ITER_KEYS = {
    "cclip_iters_mean": "BTARD, mean over partitions",
    "cclip_iters_max": "BTARD, max over partitions",
    "agg_iterations": "cclip_ps on the server",
}
STEP_LABEL = "training step (optimizer steps)"
HONEST, BYZANTINE = "tab:blue", "tab:red"


def is_run_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def load_single_run(path: str | Path) -> RunData:
    """A run folder as RunData, labelled by its own attack and defense names."""
    path = Path(path)
    run = load_run(path, path)
    run.attack = str(run.flat.get("attack.name", "none"))
    run.defense = str(run.flat.get("defense.name", "mean"))
    return run


def ban_events(run: RunData) -> list[dict]:
    """The run's bans in step order: from events.jsonl (with who accused and why), else from the summary."""
    events = [e for e in _read_jsonl(run.path / "events.jsonl") if e.get("type") == "ban"]
    if not events:
        events = [{"step": s, "peer": p, "by": None, "reason": ""} for p, s in run.bans.items()]
    return sorted(events, key=lambda e: (int(e.get("step", 0)), int(e.get("peer", -1))))


# ---- figures ---------------------------------------------------------------------------------------------


def _run_title(run: RunData) -> str:
    byz = int(run.flat.get("byzantine", 0) or 0)
    attack = run.attack if run.attack_on else "no attack"
    return f"{run.flat.get('name', run.path.name)}: {run.defense}, {attack}, {byz} of {run.flat.get('peers')} Byzantine"


def _curve(run: RunData, key: str, ylabel: str, title: str, scale: float = 1.0, **style):
    fig = new_figure((7.0, 4.0))
    ax = fig.add_subplot()
    series = run.series(key, scale)
    style = {"marker": "o" if len(series) < 40 else "", "markersize": 3, **style}
    ax.plot(list(series), list(series.values()), linewidth=1.8, color=HONEST, label=title.split(" (")[0], **style)
    _attack_marks(ax, [run])
    ax.set_title(f"{title}\n{_run_title(run)}", fontsize=10)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return fig, ax


def figure_run_accuracy(run: RunData):
    fig, ax = _curve(run, "test_accuracy", "test accuracy (%)", "Test accuracy (full test set)", 100.0)
    ax.set_ylim(0, 100)
    return fig


def figure_run_loss(run: RunData):
    return _curve(run, "train_loss", "training loss (cross-entropy)", "Training loss (mean over honest peers)")[0]


def figure_run_peers(run: RunData):
    fig, ax = _curve(run, "active_peers", "active peers (count)", "Active peers (banned peers leave)",
                     marker="", drawstyle="steps-post")
    peers, byz = int(run.flat.get("peers", 0)), int(run.flat.get("byzantine", 0) or 0)
    ban_steps = sorted(run.bans.values())
    if ban_steps:  # exact: the logged counts move only at logging steps
        steps = [0, *ban_steps, max(run.steps or 0, ban_steps[-1])]
        ax.lines[0].set_data(steps, [peers - i for i in range(len(ban_steps) + 1)] + [peers - len(ban_steps)])
    if byz:
        ax.axhline(peers - byz, color="black", linestyle=":", linewidth=1.2, label=f"honest peers ({peers - byz})")
    ax.set_ylim(0, peers + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower left", fontsize=9)
    return fig


def figure_run_cclip(run: RunData):
    """CenteredClip iterations per step, or None when the defense logs none."""
    logged = {k for rec in run.metrics for k in rec}
    keys = sorted(k for k in logged if (k.startswith("cclip_iter") or k in CCLIP_ITER_KEYS) and run.series(k))
    if not keys:
        return None
    fig = new_figure((7.0, 4.0))
    ax = fig.add_subplot()
    for key in keys:
        series = run.series(key)
        what = CCLIP_ITER_KEYS.get(key)
        ax.plot(list(series), list(series.values()), linewidth=1.5, label=f"{key} ({what})" if what else key)
    _attack_marks(ax, [run])
    ax.set_title(f"CenteredClip iterations to converge, per logging window\n{_run_title(run)}", fontsize=10)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("iterations (count)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def figure_ban_timeline(run: RunData):
    """One row per peer: a bar while it takes part, an x where it was banned; Byzantine rows in red."""
    peers = int(run.flat.get("peers", 0))
    byzantine = set(run.byzantine_peers or [])
    last = run.steps or 0
    bans = run.bans
    fig = new_figure((7.0, 1.6 + 0.22 * peers))
    ax = fig.add_subplot()
    labelled: set[str] = set()  # one legend entry per kind of line

    def label(text: str) -> str | None:
        if text in labelled:
            return None
        labelled.add(text)
        return text

    for p in range(peers):
        color = BYZANTINE if p in byzantine else HONEST
        kind = "Byzantine peer" if p in byzantine else "honest peer"
        end = bans.get(p, last)
        ax.plot([0, end], [p, p], color=color, linewidth=4, alpha=0.5, solid_capstyle="butt",
                label=label(f"{kind}, taking part"))
        if p in bans:
            ax.plot([end], [p], marker="X", markersize=9, color=color, linestyle="none",
                    label=label(f"{kind} banned"))
    _attack_marks(ax, [run])
    caught = sum(1 for p in bans if p in byzantine)
    what = f"{caught} of {len(byzantine)} Byzantine peers banned" if byzantine else "no Byzantine peers"
    ax.set_title(f"Ban timeline: {what}, {len(bans) - caught} honest\n{_run_title(run)}", fontsize=10)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("peer")
    ax.set_yticks(range(peers))
    ax.set_ylim(-0.7, peers - 0.3)
    ax.set_xlim(0, max(last, 1))
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=2, fontsize=8)
    return fig


def run_figures(run: RunData) -> dict[str, Any]:
    """name -> Figure: accuracy, loss, peers, cclip (if logged), bans."""
    figures = {
        "accuracy": figure_run_accuracy(run),
        "loss": figure_run_loss(run),
        "peers": figure_run_peers(run),
        "cclip": figure_run_cclip(run),
        "bans": figure_ban_timeline(run),
    }
    return {k: v for k, v in figures.items() if v is not None}


# ---- report.md -------------------------------------------------------------------------------------------

FIGURE_CAPTIONS = {
    "accuracy": "test accuracy",
    "loss": "training loss",
    "peers": "active peers",
    "cclip": "CenteredClip iterations",
    "bans": "ban timeline",
}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def run_facts(run: RunData) -> list[tuple[str, str]]:
    """(what, value) rows: the setup, then what happened."""
    f = run.flat
    byz = run.byzantine_peers or []
    attack = "none" if not run.attack_on else f"{run.attack} from step {f.get('attack.start', 0)}"
    rows = [
        ("status", run.status),
        ("peers", f"{f.get('peers')} ({len(byz)} Byzantine: {', '.join(map(str, byz))})" if byz
         else f"{f.get('peers')} (no Byzantine peers)"),
        ("attack", attack),
        ("defense", f"{run.defense} (tau {f.get('defense.tau')})" if run.defense == "btard" else run.defense),
        ("steps", f"{run.steps} of {f.get('train.steps')} (test set every {f.get('train.eval_every')})"),
        ("final test accuracy", f"{_pct(run.final_accuracy)} (best {_pct(run.best_accuracy)})"),
    ]
    if byz:
        caught = f"{run.byzantine_banned} of {len(byz)}"
        if run.last_byzantine_ban is not None:
            caught += f", the last at step {run.last_byzantine_ban}"
        rows.append(("attackers banned", caught))
    rows.append(("honest peers banned", str(run.honest_banned)))
    if run.wall_seconds is not None:
        rows.append(("wall time", f"{run.wall_seconds:.0f} s"))
    return rows


def _ban_table(run: RunData) -> list[str]:
    events = ban_events(run)
    if not events:
        return ["No peer was banned."]
    byzantine = set(run.byzantine_peers or [])
    lines = ["| step | peer | peer is | banned by | reason |", "|---:|---:|---|---|---|"]
    for e in events:
        kind = "Byzantine" if e.get("peer") in byzantine else "**honest**"
        by = "" if e.get("by") is None else str(e["by"])
        reason = str(e.get("reason", "")).replace("|", "\\|")
        lines.append(f"| {e.get('step')} | {e.get('peer')} | {kind} | {by} | {reason} |")
    return lines


def make_run_report(path: str | Path, out: str | Path | None = None) -> ReportOutputs:
    """report.md, results.csv (one row) and the figures of `run_figures` for the run folder `path`."""
    path = Path(path)
    out = Path(out) if out is not None else path
    out.mkdir(parents=True, exist_ok=True)
    run = load_single_run(path)
    results = write_results_csv([run], out / "results.csv")
    figures = [_save(fig, out / f"{name}.png") for name, fig in run_figures(run).items()]
    md = [f"# byztrain run report: {run.flat.get('name', path.name)}", "", f"Run folder `{path}`.", ""]
    md += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in run_facts(run)), ""]
    md += ["## Bans", "", *_ban_table(run), "", "## Figures", ""]
    md += [f"![{FIGURE_CAPTIONS[p.stem]}]({p.name})" for p in figures]
    md += ["", "Numbers per logged step: `metrics.jsonl`; protocol events: `events.jsonl`.", ""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    counts = {s: int(run.status == s) for s in ("finished", "unfinished", "failed")}
    table = [f"{k:<20} {v}" for k, v in run_facts(run)]
    return ReportOutputs(
        results, report, figures, 1, counts["finished"], counts["unfinished"], counts["failed"], table
    )


def make_report(root: str | Path, out: str | Path | None = None) -> ReportOutputs:
    """`byztrain report ROOT`: the single-run report of a run folder, the sweep report of anything else."""
    if is_run_folder(root):
        return make_run_report(root, out)
    return make_sweep_report(root, out)
