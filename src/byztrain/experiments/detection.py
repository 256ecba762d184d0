"""Detection time against its model: when BTARD's validators ban gradient cheaters, and what the draw predicts.

A sign-flipping attacker commits to the gradient it sends, so every check of the aggregation passes and only
a validator's recomputation exposes it: an attacker that cheated at step t-1 as a worker is banned at step t
when a validator that reports it draws it as its target. The prediction is a Monte Carlo of exactly that,
built on the protocol's own pieces rather than on a formula:

- validators and targets from `choose_validators` (protocol/validators.py), with r_{t-1} uniform (MPRNG's
  output is uniform while one participant is honest), over the active peers and last step's workers;
- the attack window from `attack_active` (attacks/base.py): an attacker lies at step s iff the window covers s;
- a Byzantine validator never reports a fellow attacker (`Attack.on_report`, which runs at every step);
- accusations resolved in validator order, a banned validator's accusation dropped (`BtardDefense._resolve`);
- a banned peer leaves the active set after its step (`Trainer.train_step`); peer 0 is never Byzantine.

Sign flipping triggers nothing else (its parts match its commitments and its check scalars are true), so
the simulated ban steps have the distribution of the real ones; `tests/test_detection.py` checks the Monte
Carlo against an exact recursion (m = 1, b = 1) and against real runs.

`byztrain report DIR` adds a "Detection time" section (`detection_report`) when every run below DIR is BTARD
under a modelled attack: per cell (peers, validators, byzantine, attack window), the measured ban delays
(ban step - attack.start, for every attacker of every seed, censored at the run's last step; Kaplan-Meier)
against the Monte Carlo's, as a figure and a table.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from byztrain.attacks.base import attack_active
from byztrain.config import Config
from byztrain.experiments.figures import new_figure
from byztrain.protocol.validators import choose_validators

#: attacks the model covers: caught by validators only, in every step they are on
MODELLED_ATTACKS = ("sign_flip",)
#: fixed Monte Carlo seed: a report is a function of its run folders
MC_SEED = 17


@dataclass(frozen=True)
class Cell:
    """What the ban-time distribution depends on: the peers, the validators, the attackers, the window."""

    peers: int
    validators: int
    byzantine: int
    start: int
    every: int = 1
    stop: int | None = None

    @classmethod
    def of(cls, config: Config) -> Cell:
        a = config.attack
        return cls(config.peers, config.defense.validators, config.byzantine, a.start, a.every, a.stop)

    def window(self, steps: int) -> list[bool]:
        """window[s]: do the attackers lie at step s (0..steps+1)? The runtime's own rule."""
        cfg = Config.from_dict({
            "peers": self.peers, "byzantine": self.byzantine,
            "attack": {"name": MODELLED_ATTACKS[0], "start": self.start, "every": self.every, "stop": self.stop},
        }, validate=False)
        return [attack_active(cfg, s) for s in range(steps + 2)]

    def label(self) -> str:
        text = f"n={self.peers}, m={self.validators}, b={self.byzantine}"
        return text + (f", every={self.every}" if self.every != 1 else "") + (
            f", stop={self.stop}" if self.stop is not None else "")


@dataclass
class AttackerFate:
    ban_step: int | None  # None: not banned by the last step
    attempts: int  # attack steps up to its ban step (inclusive) or the last step
    poisoned: int  # of those, the steps it sent its gradient as a worker (not sitting out as a validator)


def _relevant(window: list[bool], t: int) -> bool:
    """Whether step t can change a ban or a count: the attackers lie at t, or a validator at t audits a lie
    of t-1. Other steps only redraw validators, which matter for nothing later (targets at t+1 come from
    the workers of t, whose lies at t are none), so skipping them leaves the distribution unchanged."""
    return window[t] or window[t - 1]


def simulate_run(cell: Cell, steps: int, rng: random.Random, window: list[bool] | None = None) -> list[AttackerFate]:
    """One run's attackers under the validator draw, steps 1..`steps`."""
    window = window if window is not None else cell.window(steps)
    n = cell.peers
    byz = set(rng.sample(range(1, n), cell.byzantine))
    active, prev = list(range(n)), None
    ban: dict[int, int] = {}
    attempts = dict.fromkeys(byz, 0)
    poisoned = dict.fromkeys(byz, 0)
    for t in range(1, steps + 1):
        if len(ban) == len(byz):
            break
        if t > 1 and not _relevant(window, t):
            continue
        pairs = choose_validators(rng.getrandbits(64), t, active, prev, cell.validators)
        sitting = {v for v, _ in pairs}
        banned_now: list[int] = []
        for v, target in pairs:  # in validator order, as accusations are resolved
            if v in banned_now or target is None or target in banned_now:
                continue
            if target in byz and window[t - 1] and v not in byz:
                banned_now.append(target)
        if window[t]:
            for a in byz:
                if a in active:
                    attempts[a] += 1
                    poisoned[a] += a not in sitting
        for a in banned_now:
            ban[a] = t
        prev = [p for p in active if p not in sitting]
        active = [p for p in active if p not in banned_now]
    return [AttackerFate(ban.get(a), attempts[a], poisoned[a]) for a in sorted(byz)]


@dataclass
class Prediction:
    cell: Cell
    steps: int
    runs: int
    fates: list[AttackerFate]

    def delays(self) -> tuple[np.ndarray, np.ndarray]:
        """(time, banned): steps after attack.start until the ban, or the censoring time (steps - start)."""
        return _delays(self.fates, self.cell.start, self.steps)


def predict(cell: Cell, steps: int, runs: int = 1000, seed: int = MC_SEED) -> Prediction:
    """Monte Carlo of `runs` runs of `steps` steps."""
    rng = random.Random(f"{seed}/{cell}/{steps}")
    window = cell.window(steps)
    fates = [f for _ in range(runs) for f in simulate_run(cell, steps, rng, window)]
    return Prediction(cell, steps, runs, fates)


def _delays(fates: list[AttackerFate], start: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    time = np.array([(f.ban_step if f.ban_step is not None else steps) - start for f in fates], dtype=float)
    banned = np.array([f.ban_step is not None for f in fates], dtype=bool)
    return time, banned


# ---- exact survival for one attacker and one validator -----------------------------------------------------


def exact_survival_one_attacker(n: int, start: int, horizon: int) -> np.ndarray:
    """P(T > k) for k = 0..horizon, T = ban step - start, for b = 1, m = 1, an attacker lying at every step
    from `start` (>= 2): a recursion over whether the attacker was the validator at the previous step.

    While the lone attacker is active the validator V_t is uniform over the n peers and independent across
    steps. A worker at t-1 (V_{t-1} != a) that lied is caught at t with probability 1/(n-1): V_t is an
    honest peer other than V_{t-1} (probability (n-2)/n) and draws a among n-2 candidates, or V_t = V_{t-1}
    (1/n) and draws a among n-1.
    """
    q = 1.0 / (n - 1)
    # after step `start` (its first lie): a validator there w.p. 1/n; step 1 has no validator
    sit = 0.0 if start <= 1 else 1.0 / n
    alive = np.array([1.0 - sit, sit])  # [worker at the last step, validator at the last step], not yet banned
    out = [1.0]
    for _ in range(horizon):
        worker, validator = alive
        # from "worker" (it lied): validator now w.p. 1/n; caught w.p. q; else a worker again
        # from "validator" (it did not send): validator again w.p. 1/n, else a worker
        alive = np.array([worker * ((n - 1) / n - q) + validator * (n - 1) / n, (worker + validator) / n])
        out.append(float(alive.sum()))
    return np.array(out)


# ---- survival estimates ------------------------------------------------------------------------------------


def kaplan_meier(time: np.ndarray, banned: np.ndarray, horizon: int) -> np.ndarray:
    """S(k) = P(T > k) for k = 0..horizon from integer times, `banned` False for a censored time (T > time).
    With every time censored at the same horizon this is one minus the empirical CDF."""
    surv = np.ones(horizon + 1)
    s = 1.0
    for k in range(1, horizon + 1):
        at_risk = np.count_nonzero(time >= k)
        events = np.count_nonzero((time == k) & banned)
        if at_risk:
            s *= 1.0 - events / at_risk
        surv[k] = s
    return surv


def restricted_mean(surv: np.ndarray) -> float:
    """E[min(T, H)] = sum_{k < H} S(k), H = len(surv) - 1."""
    return float(surv[:-1].sum())


def median_time(surv: np.ndarray) -> int | None:
    """The first k with S(k) <= 1/2, None when the curve stays above (the median lies past the horizon)."""
    hit = np.nonzero(surv <= 0.5)[0]
    return int(hit[0]) if hit.size else None



# ---- measured ban steps ------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One cell's runs: every attacker's fate (poisoned unknown: -1), per run, and the runs' last steps."""

    cell: Cell
    fates: list[list[AttackerFate]]  # per run
    steps: list[int]  # per run
    names: list[str]

    def delays(self, runs: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        idx = range(len(self.fates)) if runs is None else runs
        parts = [_delays(self.fates[i], self.cell.start, self.steps[i]) for i in idx]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @property
    def horizon(self) -> int:
        """Steps after attack.start that every run covers."""
        return min(self.steps) - self.cell.start

    @property
    def attackers(self) -> int:
        return sum(len(f) for f in self.fates)


def measured_fates(run, cell: Cell) -> tuple[list[AttackerFate], int]:
    """(fate of each Byzantine peer, last step) of a report RunData."""
    steps = int(run.steps or 0)
    window = cell.window(steps)
    bans = run.bans
    fates = []
    for a in run.byzantine_peers or []:
        ban = bans.get(a)
        end = min(ban, steps) if ban is not None else steps
        fates.append(AttackerFate(ban, sum(window[1 : end + 1]), -1))
    return fates, steps


def is_detection_grid(runs) -> bool:
    """Every run BTARD with validators under a modelled attack: the report then adds its detection section."""
    return bool(runs) and all(
        r.flat.get("defense.name") == "btard"
        and r.flat.get("attack.name") in MODELLED_ATTACKS
        and int(r.flat.get("byzantine", 0) or 0) > 0
        and int(r.flat.get("defense.validators", 1) or 0) > 0
        for r in runs
    )


def group_cells(runs) -> dict[Cell, Measured]:
    cells: dict[Cell, Measured] = {}
    for r in runs:
        if r.byzantine_peers is None or not r.steps:
            continue
        cell = Cell.of(Config.from_dict(r.config, validate=False))
        fates, steps = measured_fates(r, cell)
        m = cells.setdefault(cell, Measured(cell, [], [], []))
        m.fates.append(fates)
        m.steps.append(steps)
        m.names.append(r.rel)
    return dict(sorted(cells.items(), key=lambda kv: _cell_order(kv[0])))


def _cell_order(c: Cell):
    return (c.validators, c.every, c.stop or 0, c.start, c.peers, c.byzantine)


# ---- the report section ------------------------------------------------------------------------------------

#: Monte Carlo runs per cell in a report (about 1 s per 100 runs of 300 steps at n = 64)
REPORT_MC_RUNS = 1000
#: Monte Carlo runs per cell for the uncapped damage (runs go on until every attacker is banned)
DAMAGE_MC_RUNS = 300
#: the uncapped damage Monte Carlo stops after this many attack steps (reported when it is reached)
DAMAGE_MAX_ATTACKS = 2000


@dataclass
class CellResult:
    measured: Measured
    predicted: Prediction
    surv_measured: np.ndarray  # S(k), k = 0..horizon
    surv_predicted: np.ndarray
    mean_ci: tuple[float, float]  # 95 % bootstrap interval of the measured restricted mean, over runs

    @property
    def horizon(self) -> int:
        return len(self.surv_measured) - 1


def compare_cell(measured: Measured, runs: int = REPORT_MC_RUNS, boot: int = 1000) -> CellResult:
    h = measured.horizon
    pred = predict(measured.cell, measured.cell.start + h, runs)
    s_meas = kaplan_meier(*measured.delays(), h)
    s_pred = kaplan_meier(*pred.delays(), h)
    # runs, not attackers, are the independent units (one run's attackers share its validator draws)
    rng = np.random.default_rng(MC_SEED)
    k = len(measured.fates)
    means = [restricted_mean(kaplan_meier(*measured.delays(list(rng.integers(0, k, k))), h)) for _ in range(boot)]
    lo, hi = np.percentile(means, [2.5, 97.5]) if k > 1 else (float("nan"), float("nan"))
    return CellResult(measured, pred, s_meas, s_pred, (float(lo), float(hi)))


def figure_detection(results: list[CellResult]):
    """One panel per cell: the measured share of attackers banned by k steps after the attack start
    (Kaplan-Meier; the empirical CDF when every run has the same length) and the Monte Carlo's."""
    ncols = min(3, len(results)) if len({r.measured.cell.peers for r in results}) <= 1 else len(
        {r.measured.cell.peers for r in results})
    nrows = -(-len(results) // ncols)
    fig = new_figure((max(4.0 * ncols, 6.5), 3.0 * nrows + 0.4))  # room for the title over one panel
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for i, (ax, res) in enumerate(zip(axes.flat, results, strict=False)):
        k = np.arange(res.horizon + 1)
        runs = len(res.measured.fates)
        ax.step(k, 1 - res.surv_measured, where="post", color="C0", linewidth=1.6,
                label=f"measured ({res.measured.attackers} attackers, {runs} run{'s' if runs > 1 else ''})")
        ax.plot(k, 1 - res.surv_predicted, color="C3", linestyle="--", linewidth=1.4,
                label=f"validator model (Monte Carlo, {res.predicted.runs} runs)")
        ax.set_title(res.measured.cell.label(), fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, res.horizon)
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("attackers banned (share)")
        if i >= len(results) - ncols:
            ax.set_xlabel("steps after the attack start")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Ban time: measured vs the validator draw's prediction")
    return fig


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _median_text(surv: np.ndarray) -> str:
    m = median_time(surv)
    return f"> {len(surv) - 1}" if m is None else str(m)


def detection_table(results: list[CellResult]) -> list[str]:
    rows = [
        "| cell | runs | attackers | banned within H steps: measured / model | mean steps to ban, capped at H: "
        "measured [95 % CI over runs] / model | median: measured / model | largest CDF gap | H |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.measured
        lo, hi = r.mean_ci
        ci = f"[{lo:.1f}, {hi:.1f}]" if len(m.fates) > 1 else "[one run]"
        gap = float(np.abs(r.surv_measured - r.surv_predicted).max())
        rows.append(
            f"| {m.cell.label()} | {len(m.fates)} | {m.attackers} "
            f"| {_pct(1 - r.surv_measured[-1])} / {_pct(1 - r.surv_predicted[-1])} "
            f"| {restricted_mean(r.surv_measured):.1f} {ci} / {restricted_mean(r.surv_predicted):.1f} "
            f"| {_median_text(r.surv_measured)} / {_median_text(r.surv_predicted)} | {gap:.2f} | {r.horizon} |"
        )
    return rows


def uncapped_damage(cell: Cell, runs: int = DAMAGE_MC_RUNS) -> dict[str, float]:
    """Per attacker, from the model with runs long enough for every ban: mean attack steps up to the ban,
    mean poisoned aggregates (attack steps it sent as a worker) and mean steps from the start to the ban;
    `unbanned` is the share still active after DAMAGE_MAX_ATTACKS attack steps."""
    steps = cell.start + DAMAGE_MAX_ATTACKS * cell.every
    if cell.stop is not None:
        steps = min(steps, cell.stop + 1)
    pred = predict(cell, steps, runs)
    f = pred.fates
    time, banned = pred.delays()
    return {
        "attempts": float(np.mean([x.attempts for x in f])),
        "poisoned": float(np.mean([x.poisoned for x in f])),
        "steps": float(time.mean()),
        "unbanned": float(1 - banned.mean()),
    }


def _damage_text(cell: Cell) -> str:
    d = uncapped_damage(cell)
    cap = f" ({_pct(d['unbanned'])} never banned)" if d["unbanned"] > 0 else ""
    return f"{d['attempts']:.1f} / {d['poisoned']:.1f} / {d['steps']:.0f}{cap}"


def damage_table(results: list[CellResult]) -> list[str]:
    """Attack steps before the ban: measured against the model within the runs; the model's uncapped means,
    and the same attackers' at every = 1."""
    rows = [
        "| cell | attack steps before the ban, within the runs: measured / model | model, uncapped: attack "
        "steps / poisoned aggregates / steps to ban | same attackers at every = 1 |",
        "|---|---|---|---|",
    ]
    for r in results:
        c = r.measured.cell
        meas = np.mean([f.attempts for fs in r.measured.fates for f in fs])
        pred = np.mean([f.attempts for f in r.predicted.fates])
        here = _damage_text(c)
        plain = c.every == 1 and c.stop is None
        ref = "(this row)" if plain else _damage_text(Cell(c.peers, c.validators, c.byzantine, c.start))
        rows.append(f"| {c.label()} | {meas:.1f} / {pred:.1f} | {here} | {ref} |")
    return rows


def detection_report(runs, out: Path) -> tuple[list[str], list[Path]]:
    """The report's "Detection time" section (markdown lines) and its figure, for a detection grid."""
    cells = group_cells(runs)
    if not cells:
        return [], []
    results = [compare_cell(m) for m in cells.values()]
    fig = figure_detection(results)
    path = out / "detection.png"
    fig.savefig(path, dpi=fig.dpi)
    md = [
        "## Detection time against the validator model", "",
        "Each attacker's ban step minus `attack.start`, all attackers of all seeds, censored at the run's last "
        "step (Kaplan-Meier; the plain empirical CDF when every run has the same length), against a Monte Carlo "
        f"of the validator draw ({REPORT_MC_RUNS} simulated runs per cell; `byztrain.experiments.detection`: "
        "the protocol's `choose_validators` with uniform r_t, bans removing peers, Byzantine validators "
        "never reporting fellow attackers). H: steps after the start that every run covers; "
        "the capped mean is E[min(T, H)]; the largest CDF gap is max_k |S_measured(k) - S_model(k)|.", "",
        *detection_table(results), "",
        "Attack steps each attacker had up to and including its ban step (capped at the run's end); the "
        f"model's uncapped means come from {DAMAGE_MC_RUNS} simulated runs that go on until every attacker is "
        "banned (poisoned aggregates: the attack steps it was a worker, not a validator).", "",
        *damage_table(results), "",
        f"![ban time, measured vs model]({path.name})", "",
    ]
    return md, [path]
