"""Device selection and the deterministic settings a GPU run needs (validators compare recomputed gradients bit for bit: docs/protocol.md 4.2).

BTARD validators recompute other peers' gradients and compare hashes of exact bytes, so the same
(parameters, public seed) must give the same gradient bits every time on one software/hardware stack.
On CPU that already holds (fixed thread count, no nondeterministic kernels in the models used here). On
CUDA, ``configure_determinism`` switches on:

- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (kept if already set): deterministic cuBLAS reductions; it must be in
  the environment before the first cuBLAS call of the process, which the Workload's construction precedes;
- ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False`` (no autotuner picking a
  different, nondeterministic convolution algorithm per run);
- TF32 off for matmuls and convolutions (full float32: a different precision would change bits, and TF32
  depends on the GPU generation);
- ``torch.use_deterministic_algorithms(True, warn_only=True)``: deterministic kernels are chosen wherever
  PyTorch has one (scatter/index_add, ...). ``warn_only`` because a few ops used outside the gradient
  computation have no deterministic CUDA variant and would otherwise raise (``torch.median``/``kthvalue``
  with indices; the median baselines select through ``order_stats``' sorting network on a GPU instead) --
  such ops warn once instead.
  The gradient path (convolutions, BatchNorm, ReLU, mean pooling, linear, cross-entropy) has deterministic
  CUDA kernels under these settings.

The settings are process-wide and stay on after the run (a GPU process running experiments wants them
anyway). Mixed precision or a different GPU model/driver/PyTorch still changes bits: run all peers of a
comparison on one stack (docs/cifar.md).
"""

from __future__ import annotations

import os

import torch

from byztrain.config import ConfigError

__all__ = ["CUBLAS_WORKSPACE", "configure_determinism"]

CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(device: torch.device | str) -> bool:
    """Apply the deterministic CUDA settings (module docstring) when ``device`` is a CUDA device; return
    whether anything was set (False for CPU). Raises ``ConfigError`` on ``runtime.device`` when CUDA was
    asked for but this PyTorch has no usable GPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            "runtime.device",
            f"is {str(dev)!r} but no CUDA GPU is usable (PyTorch {torch.__version__}, {build}); "
            "use runtime.device=cpu or install a CUDA build of PyTorch on a GPU machine",
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            "runtime.device", f"is {str(dev)!r} but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # PyTorch >= 2.9: the new precision API only
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # (mixing it with allow_tf32 raises)
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return True
