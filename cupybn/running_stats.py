"""Running statistics with PyTorch's update rule, usable on their own or owned by a layer."""
from __future__ import annotations

from . import _checks, _device, _dispatch


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
        num_features = _checks.check_int(num_features, "num_features", 0)
        momentum = _checks.check_momentum(momentum, allow_none=True)
        count_batches = _checks.check_bool(count_batches, "count_batches")
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

    def check_update(self) -> None:
        """Raise unless :meth:`update` can run to the end: ``momentum`` a float (or None with
        ``count_batches``) and every array it writes writable (:func:`cupybn._checks.check_writable`).

        Callers that compute the batch statistics themselves call this before that work and then
        :meth:`_update`, so a call that fails leaves the state exactly as it was.
        """
        m = self.momentum
        if type(m) is not float:
            self.momentum = _checks.check_momentum(m, allow_none=self.count_batches)
        _checks.check_writable(self.mean, "running_mean")
        _checks.check_writable(self.var, "running_var")
        if self.count_batches:
            _checks.check_writable(self.num_batches_tracked, "num_batches_tracked")

    def update(self, batch_mean, batch_var, count: int) -> None:
        """Fold one batch's per-channel ``batch_mean`` and biased ``batch_var`` into the state.

        ``count`` is the number of values behind each statistic (``N * spatial`` for batch norm);
        it must be 0 (an empty batch: only the counter moves) or more than 1. The statistics may
        come from another framework on the same device; they are read through DLPack. Everything
        is checked before anything is written: a call that raises changes nothing.
        """
        self.check_update()
        if type(count) is not int:
            count = _checks.check_int(count, "count", 0)
        if count > 0:
            c = tuple(self.mean.shape)
            for a, name in ((batch_mean, "batch_mean"), (batch_var, "batch_var")):
                _checks.check_floating(a, name)
                if tuple(a.shape) != c:
                    raise ValueError(f"{name} must have shape {c} (one value per channel), "
                                     f"got shape {tuple(a.shape)}")
        self._update(batch_mean, batch_var, count)

    def _update(self, batch_mean, batch_var, count: int) -> None:
        """:meth:`update` after :meth:`check_update` (and with statistics of the right shape)."""
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
            # every value is computed and every array checked writable: the writes cannot fail
            self.mean[...] = new_mean
            self.var[...] = new_var
        if tracked is not None:
            self.num_batches_tracked[...] = tracked

    def observe(self, x) -> None:
        """Update from a batch ``x`` of shape ``(N, C, *)``: statistics over every axis but 1."""
        from .functional import batch_norm_statistics

        self.check_update()
        mean, var, count = batch_norm_statistics(x, self)
        self._update(mean, var, count)

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
