"""ResNet-18, CIFAR variant (as in the BTARD paper's code, after kuangliu/pytorch-cifar), written from scratch.

Architecture: 3x3 stem convolution (64 channels, stride 1, no max-pool), four stages of two basic blocks
(64, 128, 256, 512 channels; strides 1, 2, 2, 2; 1x1 convolution + BN shortcut where the shape changes),
global average pooling (the 4x4 average pool of the original for 32x32 inputs) and a linear classifier:
11,173,962 parameters for CIFAR-10. Convolutions have no bias (BatchNorm follows each).

BatchNorm, and why it is not ``nn.BatchNorm2d`` as is (docs/cifar.md has the full argument):

- **Training** normalises with the statistics of the batch only and keeps no running buffers, exactly like
  ``nn.BatchNorm2d`` in training mode but without the side effect. A gradient is then a pure function of
  (parameters, batch), so any peer can recompute any other peer's gradient bit for bit (BTARD validators).
  The paper's code also trains with batch statistics; it additionally keeps *peer-local* running buffers,
  which are not part of the public state and which nobody else can reproduce.
- **Evaluation** uses statistics *recalibrated* from the current parameters on a fixed public calibration
  set (``CALIBRATION_SIZE`` training images chosen by the run seed, without augmentation), in batches of
  ``CALIBRATION_BATCH`` ("precise BN"). Recalibration runs whenever the model is switched to evaluation mode
  (``model.eval()``), so evaluated accuracy is a function of the public parameters alone: every peer, a
  resumed run, or an outside auditor gets the same number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from byztrain.registry import MODELS, Entry

__all__ = ["CALIBRATION_BATCH", "CALIBRATION_SIZE", "PublicBatchNorm2d", "ResNet18", "build_resnet18"]

#: Training images used to recompute BatchNorm statistics before each evaluation (capped at the training set).
CALIBRATION_SIZE = 2048
#: Batch size of the calibration forward passes; the statistics are the average over these batches.
CALIBRATION_BATCH = 256


class PublicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training-mode output depends on the batch only (no running-buffer updates), and whose
    evaluation-mode statistics come from an explicit calibration pass (``calibrating = True``: batch
    statistics, accumulated into the buffers as a cumulative average over calibration batches)."""

    def __init__(self, num_features: int):
        super().__init__(num_features, momentum=None, track_running_stats=True)
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked)
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps
            )
        if self.training:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = PublicBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = PublicBatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), PublicBatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18. ``calibration``: normalised images (float32, N x C x H x W) for BatchNorm
    recalibration before evaluation (kept as a non-persistent buffer so it follows ``.to(device)``); with
    None, evaluation mode uses whatever the buffers hold (initially mean 0, variance 1)."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, calibration: torch.Tensor | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = PublicBatchNorm2d(64)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)
        self.register_buffer("calibration", calibration, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global average pool as a mean: equals avg_pool2d(4) on the 4x4 maps of 32x32 inputs, works for any
        # input size, and its backward is deterministic on CUDA (adaptive_avg_pool2d's is not).
        out = out.flatten(2).mean(dim=2)
        return self.linear(out)

    def train(self, mode: bool = True) -> ResNet18:
        super().train(mode)
        if not mode:
            self.calibrate()
        return self

    @torch.no_grad()
    def calibrate(self) -> None:
        """Recompute every BatchNorm's evaluation statistics from the current parameters on the calibration
        images (average over batches of ``CALIBRATION_BATCH``). Deterministic given the parameters."""
        if self.calibration is None or len(self.calibration) == 0:
            return
        norms = [m for m in self.modules() if isinstance(m, PublicBatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.calibrating = True
        try:
            for chunk in self.calibration.split(CALIBRATION_BATCH):
                self(chunk)
        finally:
            for m in norms:
                m.calibrating = False


def calibration_indices(num_train: int, seed: int, size: int | None = None) -> torch.Tensor:
    """The public calibration images: the first ``size`` of a permutation of the training set drawn from the
    run seed (sorted, so the batches do not depend on the permutation's order beyond membership)."""
    size = CALIBRATION_SIZE if size is None else size
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_train, generator=g)[: min(size, num_train)].sort().values


def build_resnet18(dataset, seed: int) -> ResNet18:
    """ResNet-18 for ``dataset`` (a ``byztrain.tasks.Dataset``): parameters from PyTorch's default layer
    initialisation under ``torch.manual_seed(seed)`` in a forked RNG (bit-identical for a seed; the caller's
    RNG state is untouched), calibration images chosen by ``seed`` (``calibration_indices``)."""
    idx = calibration_indices(dataset.num_train, seed)
    calibration, _ = dataset.train_batch(idx, 0)  # augment off: the images evaluation sees
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet18(dataset.in_channels, dataset.num_classes, calibration.contiguous())


MODELS.add(
    Entry(
        "resnet18", "ResNet-18, CIFAR variant (docs/cifar.md); BatchNorm on batch statistics only, so gradients are recomputable",
        obj=build_resnet18, reference="He et al. 2016",
    )
)
