"""Simulated runtime: every peer in this process, messages passed by reference. Notebook-friendly."""

from __future__ import annotations

from pathlib import Path

import torch

from byztrain.config import Config
from byztrain.runtime import checkpoint as ckpt
from byztrain.runtime.keyfile import ensure_key
from byztrain.runtime.outputs import RunWriter
from byztrain.runtime.trainer import Trainer


def run_simulated(
    config: Config, *, progress: bool = True, out_dir: Path | None = None, resume: bool = False
) -> dict:
    """Run `config` in this process. `resume`: continue from the run folder's checkpoint (if any; a finished
    run returns its summary; without a checkpoint the run starts over). The MPRNG key is the run folder's
    `mprng.key`, created on the first start there (runtime/keyfile.py)."""
    run_dir = Path(out_dir) if out_dir is not None else config.out_dir
    info = None
    if resume:  # before the thread count is set: a refused resume leaves the caller's threads alone
        info, finished = ckpt.prepare_resume(config, run_dir)
        if finished is not None:
            return finished
    else:
        ckpt.clear(run_dir)
    threads = config.runtime.threads
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    writer = RunWriter(config, run_dir, resume=info is not None)
    try:
        trainer = Trainer(config, writer=writer, progress=progress, secret_key=ensure_key(run_dir))
        if info is not None:
            common, own = ckpt.read(info)
            trainer.load_state(ckpt.from_bytes(common), own)
            writer.event(ckpt.resume_event(info, "simulated"))
        summary = trainer.run()
        writer.summary(summary)
        return summary
    finally:
        writer.close()
        if threads:
            torch.set_num_threads(previous_threads)
