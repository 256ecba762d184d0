"""The Python entry point: `byztrain.run(config)`."""

from __future__ import annotations

from pathlib import Path

from byztrain.config import Config
from byztrain.runtime.distributed import run_distributed
from byztrain.runtime.simulated import run_simulated


def run(
    config: Config | dict | str | Path,
    *,
    quiet: bool = False,
    overrides: list[str] | None = None,
    resume: bool = False,
) -> dict:
    """Run one training run and return its summary (also written to <log.out>/summary.json).

    `config` may be a Config, a plain mapping, or a path to a YAML file; `overrides` are dotted
    `key=value` strings applied on top. `resume=True` continues from the last checkpoint in the run folder
    (docs/distributed.md): only runtime.* and log.* may differ from the run's saved config.
    """
    if isinstance(config, (str, Path)):
        config = Config.load(config, overrides)
    elif isinstance(config, dict):
        config = Config.from_dict(config)
        if overrides:
            config = config.with_overrides(overrides)
    else:
        config = config.with_overrides(overrides) if overrides else config.validate()
    if config.runtime.kind == "distributed":
        return run_distributed(config, progress=not quiet, resume=resume)
    return run_simulated(config, progress=not quiet, resume=resume)
