"""The run folder contract (README, Outputs): config.yaml, metrics.jsonl, events.jsonl, summary.json, tb/.

Every metrics/events line is flushed as it is written, so a killed run keeps everything it logged;
summary.json is written atomically (temp file + rename), so it exists only for finished runs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from byztrain.config import Config

# Fields that differ between identical runs; determinism checks ignore them.
WALL_CLOCK_FIELDS = ("time_s", "wall_seconds", "step_seconds")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become null (JSON has no NaN), tensors become numbers."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class RunWriter:
    def __init__(self, config: Config, out_dir: Path | None = None, *, resume: bool = False):
        self.config = config
        self.dir = Path(out_dir) if out_dir is not None else config.out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "summary.json").unlink(missing_ok=True)
        config.save(self.dir / "config.yaml")
        mode = "a" if resume else "w"
        self._metrics = open(self.dir / "metrics.jsonl", mode)
        self._events = open(self.dir / "events.jsonl", mode)
        self._tb = None
        if config.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._tb = SummaryWriter(str(self.dir / "tb"))

    def metrics(self, record: dict) -> None:
        self._metrics.write(json.dumps(_clean(record)) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self._tb.add_scalar(key, value, step)

    def event(self, record: dict) -> None:
        self._events.write(json.dumps(_clean(record)) + "\n")
        self._events.flush()

    def summary(self, summary: dict) -> None:
        write_json_atomic(self.dir / "summary.json", summary)

    def close(self) -> None:
        for f in (self._metrics, self._events):
            if not f.closed:
                f.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
