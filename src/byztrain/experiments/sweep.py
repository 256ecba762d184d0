"""Sweeps: expand a grid file into runs, name their folders, run them in a process pool, resume after a kill.

Grid format (docs/experiments.md): a grid is an ordinary config mapping in which

* a list at a scalar key expands: ``seed: [0, 1, 2]`` is three runs;
* a list of mappings at a section (``attack``, ``defense``, ...) or at a free-form mapping (``attack.params``)
  expands into *variants*, each merged into that section and itself expanded:
  ``defense: [{name: mean}, {name: btard, tau: [1, 10]}]`` is three runs;
* a key whose value is itself a list (``defense.pre``) expands only when given a list of lists:
  ``pre: [[], [bucketing]]`` is two runs, ``pre: [bucketing]`` is one run with that list;
* a grid that is a list of mappings is variants of the whole config, like a section's (for keys that must
  change together across sections, e.g. ``peers``, ``byzantine`` and ``defense.validators``);
* inside a free-form mapping (``attack.params``) a list expands too; to pass a literal list, wrap it:
  ``params: {sizes: [[1, 2]]}``.

All expansions multiply (Cartesian product), in the order the keys appear, the last key varying fastest.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from byztrain.api import run
from byztrain.config import Config, ConfigError, parse_override, yaml_dump, yaml_load
from byztrain.runtime.progress import progress_bar

MAX_NAME_LENGTH = 150
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


# ---- the config schema, as far as expansion needs it ------------------------------------------------


def _field_kind(path: tuple[str, ...]) -> str:
    """'section' (a nested dataclass), 'list', 'mapping' (free-form dict), 'free' (inside a free-form
    mapping), 'scalar', or 'unknown' (not a config key: left for validation to reject)."""
    tp: Any = Config
    for i, key in enumerate(path):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return "free" if _is_mapping_type(tp) else "unknown"
        hints = get_type_hints(tp)
        if key not in hints:
            return "unknown"
        tp = hints[key]
        if _is_mapping_type(tp) and i < len(path) - 1:
            return "free"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "section"
    if _is_mapping_type(tp):
        return "mapping"
    if tp is list or get_origin(tp) is list:
        return "list"
    return "scalar"


def _is_mapping_type(tp: Any) -> bool:
    return tp is dict or get_origin(tp) is dict


# ---- expansion ----------------------------------------------------------------------------------------


@dataclass
class GridPoint:
    """One run of a grid: its full config mapping and the values the grid chose for it."""

    index: int  # position in the expanded grid (0-based), the order shards and names are derived from
    data: dict  # the config mapping for this run (before log.out is set)
    params: dict[str, Any]  # dotted key -> value for every value that came from an expansion
    name: str = ""  # folder name, set by `name_points`
    config: Config | None = None  # the validated config, set by `validate_points`


def _expand(value: Any, path: tuple[str, ...], record_all: bool = False) -> list[tuple[Any, dict[str, Any]]]:
    """All alternatives of `value` at `path`, each with the dotted params it fixes.

    A value that came from an expansion is recorded as a parameter of the point; so is every value inside
    a variant (`record_all`), since the variant as a whole is what varies.
    """
    kind = _field_kind(path)
    where = ".".join(path)
    if isinstance(value, dict):
        return _expand_mapping(value, path, record_all)
    if not isinstance(value, list):
        return [(value, {where: value} if record_all else {})]
    if kind == "list":
        if value and all(isinstance(v, list) for v in value):
            return [(list(v), {where: list(v)}) for v in value]
        if any(isinstance(v, list) for v in value):
            raise ConfigError(
                where,
                f"mixes lists and single items ({value!r}); this key holds a list, so to sweep it give a "
                "list of lists (e.g. [[], [bucketing]]), otherwise a plain list",
            )
        return [(list(value), {where: list(value)} if record_all else {})]
    if not value:
        raise ConfigError(
            where, "an empty list expands to no runs; to pass an empty list as a value, write [[]]"
        )
    out: list[tuple[Any, dict[str, Any]]] = []
    for item in value:
        if isinstance(item, dict):
            if kind not in ("section", "mapping", "unknown"):
                raise ConfigError(where, f"is a single value, but the grid gives it a mapping: {item!r}")
            out.extend(_expand_mapping(item, path, record_all=True))
        elif kind == "section":
            raise ConfigError(
                where, f"is a section: to sweep it give a list of mappings (variants), got the item {item!r}"
            )
        else:
            # A list item is a literal list value ([[1, 2]] in a free-form mapping); anything else one value.
            item = list(item) if isinstance(item, list) else item
            out.append((item, {where: item}))
    return out


def _expand_mapping(mapping: dict, path: tuple[str, ...], record_all: bool = False):
    keys = list(mapping)
    choices = []
    for key in keys:
        if not isinstance(key, str):
            raise ConfigError(".".join((*path, str(key))), "keys must be strings")
        choices.append(_expand(mapping[key], (*path, key), record_all))
    out = []
    for combo in itertools.product(*choices):
        data = {}
        params: dict[str, Any] = {}
        for key, (value, p) in zip(keys, combo, strict=True):
            data[key] = value
            params.update(p)
        out.append((data, params))
    return out


def expand_grid(grid: dict | list) -> list[GridPoint]:
    """The product of every expansion in `grid`, in file order (last key fastest); a list of mappings is
    variants of the whole config, each expanded in turn."""
    _check_root(grid)
    expanded = _expand(grid, ()) if isinstance(grid, list) else _expand_mapping(grid, ())
    return [GridPoint(i, data, params) for i, (data, params) in enumerate(expanded)]


def _check_root(grid: Any, where: str = "a grid") -> None:
    if isinstance(grid, dict) or (isinstance(grid, list) and grid and all(isinstance(g, dict) for g in grid)):
        return
    raise ConfigError("<file>", f"{where} must be a YAML mapping or a list of mappings, got {type(grid).__name__}")


def apply_grid_overrides(grid: dict | list, overrides: Iterable[str]) -> dict | list:
    """Dotted `key=value` overrides (values parsed as YAML, so a list expands). A section given as variants
    (a list of mappings) gets the override in every variant: `attack.start=10` sets each attack's start."""
    grid = copy.deepcopy(grid)
    for text in overrides:
        keys, value = parse_override(text)
        for variant in grid if isinstance(grid, list) else [grid]:
            _set_path(variant, keys, value, ".".join(keys))
    return grid


def _set_path(node: dict, keys: list[str], value: Any, full: str) -> None:
    head, rest = keys[0], keys[1:]
    if not rest:
        node[head] = copy.deepcopy(value)
        return
    child = node.get(head)
    if child is None:
        child = node[head] = {}
    if isinstance(child, list) and child and all(isinstance(v, dict) for v in child):
        for variant in child:
            _set_path(variant, rest, value, full)
        return
    if not isinstance(child, dict):
        raise ConfigError(full, f"'{head}' is not a section, cannot set a sub-key")
    _set_path(child, rest, value, full)


def load_grid(path: str | Path, overrides: Iterable[str] = ()) -> dict | list:
    path = Path(path)
    if not path.exists():
        raise ConfigError("<file>", f"grid file {str(path)!r} does not exist")
    data = yaml_load(path.read_text()) or {}
    _check_root(data, str(path))
    return apply_grid_overrides(data, overrides)


# ---- naming -------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}" if value == value else "nan"
    if isinstance(value, list):
        return "+".join(format_value(v) for v in value) if value else "empty"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def sanitise(text: str) -> str:
    text = _UNSAFE.sub("_", text).strip(".")
    return text or "_"


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def varying_keys(points: list[GridPoint]) -> list[str]:
    """Dotted keys whose value differs between grid points (or that some points do not set), sorted."""
    keys = sorted({k for p in points for k in p.params})
    missing = object()
    out = []
    for k in keys:
        values = {json.dumps(p.params.get(k, missing), sort_keys=True, default=repr) for p in points}
        if len(values) > 1:
            out.append(k)
    return out


def name_points(points: list[GridPoint], default: str = "run") -> list[GridPoint]:
    """Set each point's folder name from its varying parameters: `key=value,key=value` in key order,
    sanitised to [A-Za-z0-9._=,+-]; names longer than MAX_NAME_LENGTH and collisions get a hash suffix.
    A grid with nothing varying names its single run `default`."""
    keys = varying_keys(points)
    raw = []
    for p in points:
        parts = [f"{k}={format_value(p.params[k])}" for k in keys if k in p.params]
        if not parts and keys:  # a variant that sets none of the varying keys keeps their defaults
            parts = [f"{k}=default" for k in keys]
        raw.append(",".join(parts) if parts else default)
    names = []
    for text in raw:
        name = sanitise(text)
        if len(name) > MAX_NAME_LENGTH:
            name = f"{name[: MAX_NAME_LENGTH - 9]}-{_short_hash(text)}"
        names.append(name)
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    for p, text, name in zip(points, raw, names, strict=True):
        if counts[name] > 1:
            blob = json.dumps(p.data, sort_keys=True, default=repr)
            name = f"{name}-{_short_hash(text + blob)}"
        p.name = name
    return points


# ---- validation, sharding, status ---------------------------------------------------------------------


def point_label(point: GridPoint, total: int) -> str:
    return f"grid point {point.index + 1}/{total} ({point.name})"


def validate_points(points: list[GridPoint]) -> list[GridPoint]:
    """Build and validate every config before anything runs; the error names the field and the grid point."""
    for p in points:
        try:
            p.config = Config.from_dict(copy.deepcopy(p.data))
        except ConfigError as exc:
            prefix = f"config field '{exc.field}': "
            message = str(exc)[len(prefix) :] if str(exc).startswith(prefix) else str(exc)
            raise ConfigError(exc.field, f"{message} [at {point_label(p, len(points))}]") from None
    return points


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ConfigError("--shard", f"must look like i/k (e.g. 1/2), got {text!r}")
    i, k = int(m.group(1)), int(m.group(2))
    if k < 1 or not 1 <= i <= k:
        raise ConfigError("--shard", f"needs 1 <= i <= k, got {text!r}")
    return i, k


def select_shard(points: list[GridPoint], shard: tuple[int, int] | None) -> list[GridPoint]:
    """Every k-th point starting at the i-th (1-based): shards 1/k .. k/k partition the grid."""
    if shard is None:
        return list(points)
    i, k = shard
    return [p for p in points if p.index % k == i - 1]


def run_status(run_dir: Path, config: Config) -> str:
    """'finished' (summary.json with this config's hash: skip), 'rerun' (folder exists: unfinished, failed
    or another config) or 'new'."""
    summary = run_dir / "summary.json"
    if summary.exists():
        try:
            if json.loads(summary.read_text()).get("config_hash") == config.config_hash():
                return "finished"
        except (OSError, ValueError):
            pass
        return "rerun"
    return "rerun" if run_dir.exists() else "new"


# ---- execution ----------------------------------------------------------------------------------------


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def execute_run(config_data: dict, run_dir: str) -> dict:
    """Run one grid point in this process, from scratch. Never raises: failures come back as a record and
    an error.txt in the run folder."""
    started = time.perf_counter()
    path = Path(run_dir)
    try:
        if path.exists():
            shutil.rmtree(path)  # an unfinished or stale run restarts from scratch
        config = Config.from_dict(config_data)
        summary = run(config, quiet=True)
        return {"status": "ok", "summary": summary, "wall": time.perf_counter() - started}
    except BaseException as exc:  # noqa: BLE001 — a failing run must not kill the sweep
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = traceback.format_exc()
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "error.txt").write_text(text)
        except OSError:
            pass
        last = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return {
            "status": "failed",
            "error": last[0] if last else type(exc).__name__,
            "traceback": text,
            "wall": time.perf_counter() - started,
        }


@dataclass
class SweepResult:
    out: Path
    total: int  # points in the whole grid
    selected: list[GridPoint]  # this shard's points
    skipped: list[GridPoint] = field(default_factory=list)
    ran: list[GridPoint] = field(default_factory=list)
    failed: list[tuple[GridPoint, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def plan(
    grid: dict | list | str | Path,
    overrides: Iterable[str] = (),
    *,
    out: str | Path | None = None,
    shard: str | tuple[int, int] | None = None,
) -> tuple[Path, list[GridPoint], list[GridPoint]]:
    """Expand, name and validate the whole grid; return (output root, all points, this shard's points)."""
    shard_t = parse_shard(f"{shard[0]}/{shard[1]}" if isinstance(shard, tuple) else shard)
    default_name = "sweep"
    if isinstance(grid, (str, Path)):
        default_name = Path(grid).stem
        data = load_grid(grid, overrides)
    else:
        data = apply_grid_overrides(grid, overrides)
    root = _output_root(data, out, default_name)
    points = name_points(expand_grid(data))
    validate_points(points)
    for p in points:
        assert p.config is not None
        p.config = dataclasses.replace(
            p.config, log=dataclasses.replace(p.config.log, out=str(root / p.name))
        )
    return root, points, select_shard(points, shard_t)


def _output_root(data: dict | list, out: str | Path | None, default_name: str) -> Path:
    if out is not None:
        return Path(out)
    roots = set()
    for variant in data if isinstance(data, list) else [data]:
        log = variant.get("log") if isinstance(variant.get("log"), dict) else {}
        roots.add(log["out"] if isinstance(log.get("out"), str) and log["out"] else None)
    if len(roots) == 1 and None not in roots:  # variants that disagree fall back to the default
        return Path(roots.pop())
    return Path("runs") / default_name


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def sweep(
    grid: dict | list | str | Path,
    overrides: Iterable[str] = (),
    *,
    out: str | Path | None = None,
    jobs: int | None = None,
    shard: str | tuple[int, int] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    runner: Callable[[dict, str], dict] | None = None,
    isolate: bool = True,
) -> SweepResult:
    """Run a grid: skip finished runs, (re)run the rest in a pool of `jobs` processes (spawn, 1 thread each).

    Every config is validated before anything starts. Failing runs are recorded (error.txt in their folder)
    and do not stop the others; `SweepResult.ok` is False when any failed. `runner` (default
    `execute_run`, a picklable top-level function) is what each worker calls with (config dict, run folder).
    `isolate=False` runs everything in this process, one run after the other (for debugging and tests).
    """
    root, points, selected = plan(grid, overrides, out=out, shard=shard)
    result = SweepResult(out=root, total=len(points), selected=selected)
    say = echo or (lambda _msg: None)
    todo: list[GridPoint] = []
    statuses: dict[int, str] = {}
    for p in selected:
        assert p.config is not None
        statuses[p.index] = run_status(root / p.name, p.config)
        if statuses[p.index] == "finished":
            result.skipped.append(p)
        else:
            todo.append(p)
    if dry_run:
        words = {"finished": "skip (finished)", "rerun": "rerun", "new": "run"}
        for p in selected:
            say(f"{words[statuses[p.index]]:16s} {root / p.name}")
        say(
            f"{len(selected)} of {len(points)} runs in this shard: {len(result.skipped)} finished, "
            f"{len(todo)} to run (dry run: nothing started)"
        )
        return result
    if not todo:
        say(f"sweep: all {len(selected)} runs already finished in {root}")
        return result
    root.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(
        root / "sweep.yaml", yaml_dump({"runs": {p.name: p.params for p in points}})
    )
    jobs = max(1, min(jobs or default_jobs(), len(todo)))
    say(f"sweep: {len(todo)} runs to do ({len(result.skipped)} already finished) in {root}, {jobs} jobs")
    duplicates = _duplicates(points)
    if duplicates:
        say("sweep: warning: identical configs under different names: " + "; ".join(duplicates))
    _run_pool(todo, jobs, result, progress=progress, say=say, runner=runner or execute_run, isolate=isolate)
    return result


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _duplicates(points: list[GridPoint]) -> list[str]:
    seen: dict[str, str] = {}
    out = []
    for p in points:
        assert p.config is not None
        h = p.config.config_hash()
        if h in seen:
            out.append(f"{seen[h]} = {p.name}")
        else:
            seen[h] = p.name
    return out


def _run_pool(
    todo: list[GridPoint],
    jobs: int,
    result: SweepResult,
    *,
    progress: bool,
    say,
    runner,
    isolate: bool = True,
) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    bar = None
    if progress:
        bar = progress_bar(len(todo), desc="sweep", unit="run", every_s=0)  # off a terminal: a line per run
    write = bar.write if bar is not None else say

    def record(p: GridPoint, rec: dict) -> None:
        run_dir = Path(str(p.config.log.out))
        if rec["status"] == "ok":
            result.ran.append(p)
        else:
            result.failed.append((p, rec["error"]))
            write(f"FAILED {p.name}: {rec['error']} (see {run_dir / 'error.txt'})")
        if bar is not None:
            post = {"last": p.name}
            if result.failed:
                post["failed"] = len(result.failed)
            bar.set_postfix(post, refresh=False)
            bar.update(1)

    if not isolate:  # in this process, one after the other (debugging, tests)
        try:
            for p in todo:
                record(p, runner(p.config.to_dict(), str(p.config.log.out)))
        finally:
            if bar is not None:
                bar.close()
        return

    context = multiprocessing.get_context("spawn")  # never fork a process that may hold torch threads
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker)
    interrupted = False
    try:
        futures = {pool.submit(runner, p.config.to_dict(), str(p.config.log.out)): p for p in todo}
        for fut in as_completed(futures):
            p = futures[fut]
            try:
                rec = fut.result()
            except BrokenProcessPool as exc:
                rec = {"status": "failed", "error": f"worker process died ({exc})"}
                _write_error(Path(str(p.config.log.out)), rec["error"])
            record(p, rec)
    except BaseException:
        interrupted = True
        # Stop the workers now: an orphaned run must not keep writing into a folder a later sweep reuses.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _write_error(path: Path, text: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "error.txt").write_text(text + "\n")
    except OSError:
        pass
