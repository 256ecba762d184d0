"""Simulated runtime: every peer in this process, messages passed by reference. Notebook-friendly."""

from __future__ import annotations

from pathlib import Path

import torch

from byztrain.config import Config
from byztrain.runtime.outputs import RunWriter
from byztrain.runtime.trainer import Trainer


def run_simulated(config: Config, *, progress: bool = True, out_dir: Path | None = None) -> dict:
    threads = config.runtime.threads
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    writer = RunWriter(config, out_dir)
    try:
        trainer = Trainer(config, writer=writer, progress=progress)
        summary = trainer.run()
        writer.summary(summary)
        return summary
    finally:
        writer.close()
        if threads:
            torch.set_num_threads(previous_threads)
