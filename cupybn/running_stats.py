"""Running statistics with PyTorch's update rule, usable on their own or owned by a layer."""
from __future__ import annotations

import numbers

from . import _device, _dispatch


class RunningStats:
    r"""Running mean and variance of per-channel statistics, updated exactly as PyTorch does.

    After a batch with per-channel mean :math:`\mu_B` and biased variance :math:`\sigma^2_B` over
    ``n`` values per channel::

        factor = momentum                      (momentum is a float)
               = 1 / num_batches_tracked       (momentum is None: cumulative moving average)
        mean = (1 - factor) * mean + factor * mu_B
        var  = (1 - factor) * var  + factor * sigma2_B * n / (n - 1)     (unbiased)

    ``num_batches_tracked`` counts updates (when ``count_batches``), including empty batches,
    which change nothing else. The update is arithmetic on the state's own arrays — NumPy on the
    CPU, CuPy on a GPU — so on a GPU it runs on the device with no host synchronisation.

    Args:
        num_features: number of channels ``C``.
        momentum: the factor above, or ``None`` for a cumulative average. Default: 0.1.
        device: ``None``/``"cpu"`` (NumPy arrays) or ``"cuda"``/``"cuda:N"`` (CuPy arrays).
        dtype: dtype of ``mean`` and ``var`` (NumPy dtype, torch dtype or name). Default: float32.
        count_batches: whether :meth:`update` increments ``num_batches_tracked`` (InstanceNorm
            keeps the counter but never increments it, as in PyTorch).

    Attributes:
        mean: ``(C,)`` array, initially zeros.
        var: ``(C,)`` array, initially ones.
        num_batches_tracked: 0-d int64 array.

    Example::

        >>> stats = cupybn.RunningStats(3, momentum=None)
        >>> for batch in stream:            # batch: (N, 3, ...) NumPy or CuPy array
        ...     stats.observe(batch)
        >>> stats.mean, stats.var
    """

    def __init__(self, num_features: int, momentum: float | None = 0.1, *, device=None, dtype=None,
                 count_batches: bool = True):
        if not isinstance(num_features, numbers.Integral) or num_features < 0:
            raise ValueError(f"num_features must be a non-negative integer, got {num_features!r}")
        xp = _device.namespace_for(device)
        dtype = _device.parse_dtype(dtype)
        with _device.on(device):
            self.mean = xp.zeros((int(num_features),), dtype=dtype)
            self.var = xp.ones((int(num_features),), dtype=dtype)
            self.num_batches_tracked = xp.zeros((), dtype=xp.int64)
        self.momentum = momentum
        self.count_batches = count_batches

    @classmethod
    def wrap(cls, mean, var, momentum, num_batches_tracked=None, count_batches=False) -> "RunningStats":
        """Running statistics that update the given arrays in place (no copy)."""
        self = cls.__new__(cls)
        self.mean, self.var, self.num_batches_tracked = mean, var, num_batches_tracked
        self.momentum = momentum
        self.count_batches = count_batches and num_batches_tracked is not None
        return self

    @property
    def num_features(self) -> int:
        """Number of channels ``C``."""
        return int(self.mean.shape[0])

    def reset(self) -> None:
        """mean = 0, var = 1, num_batches_tracked = 0 (in place)."""
        self.mean[...] = 0
        self.var[...] = 1
        if self.num_batches_tracked is not None:
            self.num_batches_tracked[...] = 0

    def update(self, batch_mean, batch_var, count: int) -> None:
        """Fold one batch's per-channel ``batch_mean`` and biased ``batch_var`` into the state.

        ``count`` is the number of values behind each statistic (``N * spatial`` for batch norm);
        it must be 0 (an empty batch: only the counter moves) or more than 1. The statistics may
        come from another framework on the same device; they are read through DLPack.
        """
        if count == 1:
            raise ValueError("running statistics need more than 1 value per channel "
                             "(the unbiased variance divides by count - 1)")
        tracked = None
        if self.count_batches:
            tracked = self.num_batches_tracked + 1
        if count > 0:
            factor = self.momentum
            if factor is None:
                if tracked is None:
                    raise TypeError("momentum=None (cumulative average) needs num_batches_tracked")
                factor = 1.0 / tracked  # a device array on the GPU: no host synchronisation
            mean = _dispatch.convert_like(batch_mean, self.mean)
            var = _dispatch.convert_like(batch_var, self.mean) * (count / (count - 1))
            xp = _dispatch.namespace(self.mean)
            new_mean = (1 - factor) * self.mean + factor * mean
            new_var = (1 - factor) * self.var + factor * var
            # (compared first: a no-op astype still costs a few Python calls per training step)
            if new_mean.dtype != self.mean.dtype:
                new_mean = xp.astype(new_mean, self.mean.dtype)
            if new_var.dtype != self.var.dtype:
                new_var = xp.astype(new_var, self.var.dtype)
            self.mean[...] = new_mean
            self.var[...] = new_var
        if tracked is not None:
            self.num_batches_tracked[...] = tracked

    def observe(self, x) -> None:
        """Update from a batch ``x`` of shape ``(N, C, *)``: statistics over every axis but 1."""
        from .functional import batch_norm_statistics

        mean, var, count = batch_norm_statistics(x, self)
        self.update(mean, var, count)

    def to(self, device) -> "RunningStats":
        """Move the arrays to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``); returns ``self``."""
        self.mean = _device.move(self.mean, device)
        self.var = _device.move(self.var, device)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked = _device.move(self.num_batches_tracked, device)
        return self

    def __repr__(self) -> str:
        return (f"RunningStats(num_features={self.num_features}, momentum={self.momentum}, "
                f"device={_dispatch.device_name(self.mean)!r})")
