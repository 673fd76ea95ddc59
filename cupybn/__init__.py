"""cupybn: PyTorch-exact normalization layers for NumPy, CuPy and PyTorch arrays.

CPU inputs (NumPy arrays, CPU torch tensors, any array-API array) run on an array-API reference
implementation in their own framework; GPU inputs (CuPy arrays, CUDA torch tensors) run on
hand-written CUDA kernels, zero-copy. The public contract mirrors ``torch.nn`` and
``torch.nn.functional``.
"""
from . import functional
from ._dispatch import route as _route
from .functional import batch_norm, group_norm, instance_norm, layer_norm
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                      InstanceNorm2d, InstanceNorm3d, LayerNorm)
from .native import (batch_norm_backward, group_norm_backward, instance_norm_backward,
                     layer_norm_backward, native_batch_norm, native_group_norm,
                     native_instance_norm, native_layer_norm)
from .running_stats import RunningStats

__version__ = "0.1.0"  # the one definition of the version: pyproject.toml reads it ([tool.hatch.version])

__all__ = [
    "batch_norm", "instance_norm", "layer_norm", "group_norm",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RunningStats", "path_for", "functional",
    "native_batch_norm", "native_instance_norm", "native_layer_norm", "native_group_norm",
    "batch_norm_backward", "instance_norm_backward", "layer_norm_backward", "group_norm_backward",
]


def path_for(x) -> str:
    """Which implementation runs for input ``x``: ``"cpu-reference"`` or ``"gpu-kernels"``."""
    return "gpu-kernels" if _route(x) == "gpu" else "cpu-reference"
