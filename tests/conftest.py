"""Fixtures shared by the BTARD test modules."""

from __future__ import annotations

import pytest
import torch

import byztrain
from byztrain.runtime.trainer import Trainer
from byztrain.tasks import Dataset


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; intra-op threads only add contention
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def synthetic(monkeypatch):
    """A small synthetic image task (10x10, 4 classes, labels from a random teacher): a ~9.5k-parameter CNN,
    gradients in milliseconds. Real-data runs are the slow tests at the end."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 1, 10, 10, generator=g)
    teacher = torch.randn(100, 4, generator=g)
    y = (x.reshape(len(x), -1) @ teacher).argmax(dim=1)
    ds = Dataset("synthetic", 4, 1, 10, x[:1000].contiguous(), y[:1000].contiguous(), x[1000:], y[1000:])
    monkeypatch.setattr("byztrain.runtime.workload.load_dataset", lambda name, data_dir=None: ds)
    return ds


@pytest.fixture
def run_killed(monkeypatch):
    """run_killed(config, steps): run `config` and stop it as kill -9 would once `steps` steps are done
    (nothing after that step runs: no summary, no final checkpoint)."""
    original = Trainer.train_step

    def run(config, steps: int) -> None:
        def dying(self):
            if self.step == steps:
                raise KeyboardInterrupt
            return original(self)

        monkeypatch.setattr(Trainer, "train_step", dying)
        with pytest.raises(KeyboardInterrupt):
            byztrain.run(config, quiet=True)
        monkeypatch.setattr(Trainer, "train_step", original)

    return run
