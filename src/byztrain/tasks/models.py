"""Models: a small, fast CNN for MNIST-family data ("cnn"); ResNet-18 for CIFAR-10 ("resnet18", tasks/resnet.py).

A gradient is a pure function of (parameters, batch), so any peer can recompute another peer's gradient
exactly, which BTARD's validators rely on: the CNN has no BatchNorm and no dropout; ResNet-18's BatchNorm
trains on batch statistics only and keeps no running buffers in training (tasks/resnet.py, docs/cifar.md).
"""

from __future__ import annotations

import torch
from torch import nn

from byztrain.registry import MODELS, Entry

from .datasets import Dataset

__all__ = ["SmallCNN", "build_model", "count_parameters"]


class SmallCNN(nn.Module):
    """conv(C->16, 3x3, stride 2, pad 1) + ReLU -> conv(16->32, 3x3, stride 2, pad 1) + ReLU -> flatten
    -> linear ``hidden`` (64) + ReLU -> linear num_classes.

    For 28x28 greyscale: 28 -> 14 -> 7, flatten 1568, 105,866 parameters, about 0.36 M multiply-adds per
    sample. Strided convolutions replace the usual conv + max-pool pairs: on a 2-core CPU a forward+backward
    over 512 samples is about 4x faster (16 batches of 32: about 2x) than conv/pool/conv/pool/128 (108,618
    parameters), with the same Fashion-MNIST accuracy (about 90% after 1000 SGD steps of 512 samples).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, hidden: int = 64):
        super().__init__()
        side = (image_size + 3) // 4  # two stride-2 convolutions with padding 1: ceil(ceil(s / 2) / 2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, dataset: Dataset, seed: int) -> nn.Module:
    """Build model ``name`` (a MODELS entry) for ``dataset`` with parameters initialised from ``seed``.

    Every builder initialises under a forked, seeded RNG, so the same seed gives bit-identical parameters
    and the caller's global RNG state is left untouched.
    """
    return MODELS.lookup(name, "task.model").obj(dataset, seed)


def _build_cnn(dataset: Dataset, seed: int) -> SmallCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(dataset.in_channels, dataset.image_size, dataset.num_classes)


MODELS.add(
    Entry(
        "cnn", "two strided 3x3 convolutions, a 64-unit hidden layer (105,866 parameters on 28x28)",
        obj=_build_cnn, preconditions="greyscale or RGB images of any size",
    )
)
