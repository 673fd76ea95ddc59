"""InstanceNorm1d/2d/3d, as in ``torch.nn`` (batched and unbatched inputs)."""
from __future__ import annotations

import warnings

from .. import _dispatch
from .. import functional as F
from .batchnorm import _NormBase


class _InstanceNorm(_NormBase):
    """Shared forward of the instance norms (``torch.nn.modules.instancenorm._InstanceNorm``).

    As in torch: ``num_batches_tracked`` is kept but never incremented, ``momentum=None`` means
    0, and tracked running statistics receive the mean over the batch of per-instance statistics.
    """

    _unbatched_rank = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None, dtype=None,
                 *, bias: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, count_batches=False)
        if self._stats is not None:
            self._stats.momentum = self._stats_momentum(momentum)

    def _stats_momentum(self, value):
        return 0.0 if value is None else value

    def _check_input_dim(self, x) -> None:
        ranks = (self._unbatched_rank, self._unbatched_rank + 1)
        if x.ndim not in ranks:
            raise ValueError(f"expected {ranks[0]}D or {ranks[1]}D input (got {x.ndim}D input)")

    def forward(self, input):
        """Normalize each instance; batched ``(N, C, *)`` or unbatched ``(C, *)`` input."""
        x = F._as_input(input)
        self._check_input_dim(x)
        feature_dim = x.ndim - self._unbatched_rank
        if x.shape[feature_dim] != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match num_features "
                                 f"({self.num_features}), but got: {x.shape[feature_dim]}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. You can "
                          "silence this warning by not passing in num_features, which is not used "
                          "because affine=False")
        unbatched = x.ndim == self._unbatched_rank
        if unbatched:
            x = _dispatch.namespace(x).expand_dims(x, axis=0)
        y = F._instance_norm(x, self._stats, self.weight, self.bias,
                             self.training or not self.track_running_stats, self.eps)
        return _dispatch.namespace(y).squeeze(y, axis=0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    r"""Instance normalization over a 2D (unbatched) or 3D input, as ``torch.nn.InstanceNorm1d``.

    Args:
        num_features: ``C`` of an input ``(N, C, L)`` or ``(C, L)``.
        eps: added to the variance. Default: 1e-5.
        momentum: running-average factor (``None`` means 0). Default: 0.1.
        affine: learnable per-channel ``weight`` and ``bias``. Default: False.
        track_running_stats: keep running statistics (used in eval). Default: False.
        device, dtype, bias: as :class:`BatchNorm1d`.

    Shape:
        - Input: ``(N, C, L)`` or ``(C, L)``; Output: same shape and dtype
    """

    _unbatched_rank = 2


class InstanceNorm2d(_InstanceNorm):
    r"""Instance normalization over a 3D (unbatched) or 4D input, as ``torch.nn.InstanceNorm2d``.

    Arguments as :class:`InstanceNorm1d`.

    Shape:
        - Input: ``(N, C, H, W)`` or ``(C, H, W)``; Output: same shape and dtype
    """

    _unbatched_rank = 3


class InstanceNorm3d(_InstanceNorm):
    r"""Instance normalization over a 4D (unbatched) or 5D input, as ``torch.nn.InstanceNorm3d``.

    Arguments as :class:`InstanceNorm1d`.

    Shape:
        - Input: ``(N, C, D, H, W)`` or ``(C, D, H, W)``; Output: same shape and dtype
    """

    _unbatched_rank = 4
