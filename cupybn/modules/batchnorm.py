"""BatchNorm1d/2d/3d (and the shared base of the instance norms), as in ``torch.nn``."""
from __future__ import annotations

from .. import _checks
from .. import functional as F
from ..running_stats import RunningStats
from ._module import NormModule


class _NormBase(NormModule):
    """Per-channel affine parameters and optional running statistics over ``num_features`` channels."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, count_batches: bool = True):
        num_features = _checks.check_int(num_features, "num_features", 0)
        eps = _checks.check_real(eps, "eps")
        momentum = _checks.check_momentum(momentum, allow_none=True)
        affine = _checks.check_bool(affine, "affine")
        track_running_stats = _checks.check_bool(track_running_stats, "track_running_stats")
        bias = _checks.check_bool(bias, "bias")
        super().__init__(device, dtype)
        self.num_features = num_features
        self.eps = eps
        self._momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.weight = self._new_parameter((self.num_features,), 1.0) if affine else None
        self.bias = self._new_parameter((self.num_features,), 0.0) if affine and bias else None
        if track_running_stats:
            self._stats = RunningStats(self.num_features, momentum, device=device, dtype=self._dtype,
                                       count_batches=count_batches)

    @property
    def momentum(self):
        """The running-average factor (``None``: cumulative average for BatchNorm, 0 for InstanceNorm)."""
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        value = _checks.check_momentum(value, allow_none=True)
        self._momentum = value
        if self._stats is not None:
            self._stats.momentum = self._stats_momentum(value)

    def _stats_momentum(self, value):
        return value

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, num_batches_tracked 0."""
        if self._stats is not None:
            self._stats.reset()

    def reset_parameters(self) -> None:
        """Running statistics reset; weight 1 and bias 0."""
        self.reset_running_stats()
        super().reset_parameters()

    def _check_input_dim(self, x) -> None:  # pragma: no cover - every layer defines it
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class _BatchNorm(_NormBase):
    """Shared forward of BatchNorm1d/2d/3d (``torch.nn.modules.batchnorm._BatchNorm``)."""

    _ranks: tuple[int, ...] = ()

    def _check_input_dim(self, x) -> None:
        if x.ndim not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {expected} input (got {x.ndim}D input)")

    def forward(self, input):
        """Normalize ``input``; in training with tracking, update the running statistics."""
        x = F._as_input(input)
        self._check_input_dim(x)
        if (self.affine or self.track_running_stats) and x.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels (num_features) at "
                             f"dim 1, got input of shape {tuple(x.shape)}")
        # As torch: batch statistics in training, and in eval when no running statistics are kept.
        use_batch_stats = self.training or self._stats is None
        stats = self._stats if (not self.training or self.track_running_stats) else None
        return F._batch_norm(x, stats, self.weight, self.bias, use_batch_stats, self.eps)


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2D or 3D input, as ``torch.nn.BatchNorm1d``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Args:
        num_features: ``C`` of an input of size ``(N, C)`` or ``(N, C, L)``.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: running-average factor, or ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` (ones) and ``bias`` (zeros). Default: True.
        track_running_stats: keep running statistics (used in eval). Default: True.
        device: ``None``/``"cpu"`` (NumPy state) or ``"cuda[:N]"`` (CuPy state).
        dtype: parameter and running-stat dtype. Default: float32.
        bias: with ``affine``, whether to keep a bias. Default: True.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``
        - Output: same shape and dtype as the input
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4D input ``(N, C, H, W)``, as ``torch.nn.BatchNorm2d``.

    Arguments as :class:`BatchNorm1d`.

    Shape:
        - Input: ``(N, C, H, W)``
        - Output: same shape and dtype as the input
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    r"""Batch normalization over a 5D input ``(N, C, D, H, W)``, as ``torch.nn.BatchNorm3d``.

    Arguments as :class:`BatchNorm1d`.

    Shape:
        - Input: ``(N, C, D, H, W)``
        - Output: same shape and dtype as the input
    """

    _ranks = (5,)
