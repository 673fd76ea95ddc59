"""LayerNorm and GroupNorm, as in ``torch.nn``."""
from __future__ import annotations

from .. import _checks
from .. import functional as F
from ._module import NormModule


class LayerNorm(NormModule):
    r"""Layer normalization over the last ``len(normalized_shape)`` dimensions, as ``torch.nn.LayerNorm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Args:
        normalized_shape: int or tuple, the trailing shape to normalize over.
        eps: added to the variance. Default: 1e-5.
        elementwise_affine: learnable ``weight`` (ones) of shape ``normalized_shape``. Default: True.
        bias: with ``elementwise_affine``, a learnable ``bias`` (zeros). Default: True.
        device, dtype: as :class:`BatchNorm1d`.

    Shape:
        - Input: ``(*, *normalized_shape)``; Output: same shape and dtype
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        normalized_shape = F._normalized_shape(normalized_shape)
        eps = _checks.check_real(eps, "eps")
        elementwise_affine = _checks.check_bool(elementwise_affine, "elementwise_affine")
        bias = _checks.check_bool(bias, "bias")
        super().__init__(device, dtype)
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.weight = self._new_parameter(self.normalized_shape, 1.0) if elementwise_affine else None
        self.bias = self._new_parameter(self.normalized_shape, 0.0) if elementwise_affine and bias else None

    def forward(self, input):
        """Normalize each row of ``prod(normalized_shape)`` elements."""
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class GroupNorm(NormModule):
    r"""Group normalization, as ``torch.nn.GroupNorm``.

    Channels are split into ``num_groups`` groups; each group of each sample is normalized with
    its own mean and biased variance, then a per-channel affine is applied.

    Args:
        num_groups: number of groups; must divide ``num_channels``.
        num_channels: ``C`` of an input ``(N, C, *)``.
        eps: added to the variance. Default: 1e-5.
        affine: learnable per-channel ``weight`` (ones) and ``bias`` (zeros). Default: True.
        device, dtype, bias: as :class:`BatchNorm1d`.

    Shape:
        - Input: ``(N, C, *)``; Output: same shape and dtype
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True):
        num_groups = _checks.check_int(num_groups, "num_groups", 1)
        num_channels = _checks.check_int(num_channels, "num_channels", 1)
        if num_channels % num_groups != 0:
            raise ValueError("num_channels must be divisible by num_groups")
        eps = _checks.check_real(eps, "eps")
        affine = _checks.check_bool(affine, "affine")
        bias = _checks.check_bool(bias, "bias")
        super().__init__(device, dtype)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.weight = self._new_parameter((self.num_channels,), 1.0) if affine else None
        self.bias = self._new_parameter((self.num_channels,), 0.0) if affine and bias else None

    def forward(self, input):
        """Normalize each group of each sample."""
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
