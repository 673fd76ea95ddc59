"""The small part of ``torch.nn.Module`` that normalization layers need, without torch.

A layer keeps named parameters (``weight``, ``bias``) and, when it tracks statistics, a
:class:`~cupybn.RunningStats` whose arrays appear as the buffers ``running_mean``,
``running_var`` and ``num_batches_tracked`` — the names and ``state_dict()`` keys of the torch
layers, so state dicts move between cupybn and torch layers in both directions.
"""
from __future__ import annotations

from .. import _checks, _device, _dispatch
from ..running_stats import RunningStats


_REAL_DTYPES = ("float", "bfloat", "int", "uint", "bool")  # dtypes a state dict value may have


class NormModule:
    """Base of every cupybn layer: train/eval mode, parameters, buffers, state dicts, devices."""

    _parameter_names = ("weight", "bias")

    def __init__(self, device=None, dtype=None):
        self.training = True
        self._device = device
        self._dtype = _device.parse_dtype(dtype)
        self._stats: RunningStats | None = None

    # ------------------------------------------------------------------------------- buffers
    @property
    def running_mean(self):
        """Running mean ``(C,)``, or None when statistics are not tracked."""
        return None if self._stats is None else self._stats.mean

    @property
    def running_var(self):
        """Running (unbiased) variance ``(C,)``, or None when statistics are not tracked."""
        return None if self._stats is None else self._stats.var

    @property
    def num_batches_tracked(self):
        """0-d int64 count of training calls, or None when statistics are not tracked."""
        return None if self._stats is None else self._stats.num_batches_tracked

    @property
    def running_stats(self) -> RunningStats | None:
        """The :class:`~cupybn.RunningStats` this layer owns (None when not tracking)."""
        return self._stats

    def _new_parameter(self, shape, fill: float):
        xp = _device.namespace_for(self._device)
        with _device.on(self._device):
            return xp.full(shape, fill, dtype=self._dtype)

    def reset_parameters(self) -> None:
        """Weight 1 and bias 0 (the torch initialisation)."""
        if getattr(self, "weight", None) is not None:
            self.weight[...] = 1
        if getattr(self, "bias", None) is not None:
            self.bias[...] = 0

    # ---------------------------------------------------------------------------- train/eval
    def train(self, mode: bool = True):
        """Set training mode (batch statistics, running-stat updates); returns the layer."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        return self

    def eval(self):
        """Set evaluation mode (running statistics when tracked); returns the layer."""
        return self.train(False)

    def __call__(self, input):
        return self.forward(input)

    def forward(self, input):  # pragma: no cover - every layer defines it
        raise NotImplementedError

    # ---------------------------------------------------------------------------- state dict
    def _state_items(self):
        for name in self._parameter_names:
            value = getattr(self, name)
            if value is not None:
                yield name, value
        if self._stats is not None:
            yield "running_mean", self._stats.mean
            yield "running_var", self._stats.var
            yield "num_batches_tracked", self._stats.num_batches_tracked

    def state_dict(self) -> dict:
        """Parameters and buffers by the torch layer's names (the arrays themselves, not copies)."""
        return dict(self._state_items())

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy values from ``state_dict`` (torch tensors, NumPy or CuPy arrays) into the layer.

        Values are copied into the layer's own arrays, so later changes to the source do not reach the layer. Nothing is
        changed unless every key and shape fits. A missing ``num_batches_tracked`` (checkpoints
        from old torch versions) loads as 0, as in torch.
        """
        own = dict(self._state_items())
        given = dict(state_dict)
        if "num_batches_tracked" in own and "num_batches_tracked" not in given:
            given["num_batches_tracked"] = 0
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                           f"missing keys {missing}, unexpected keys {unexpected}")
        # Every key is checked and converted before anything is written: a load that fails
        # leaves the layer exactly as it was.
        copies = {}
        for key, target in own.items():
            if key not in given:
                continue
            value = given[key]
            if not _dispatch.is_array(value):
                import numpy as np

                try:
                    value = np.asarray(value)
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"While copying the parameter named \"{key}\", expected an "
                                    f"array or a number from checkpoint, got {type(value).__name__}: "
                                    f"{exc}") from None
            dtype = _checks.dtype_name(value.dtype)
            if not dtype.startswith(_REAL_DTYPES):
                raise TypeError(f"While copying the parameter named \"{key}\", expected a real-valued "
                                f"array from checkpoint, got dtype {dtype}")
            shape = tuple(value.shape)
            if shape != tuple(target.shape):
                raise ValueError(f"size mismatch for {key}: copying a param with shape {shape} from "
                                 f"checkpoint, the shape in current model is {tuple(target.shape)}.")
            _checks.check_writable(target, key)
            copies[key] = _device.copy_into_state(value, target)
        for key, value in copies.items():  # in place, as torch does: views of the state stay valid
            own[key][...] = value
        return self

    # -------------------------------------------------------------------------------- device
    def to(self, device=None, dtype=None):
        """Move parameters and buffers to ``device`` and/or cast parameters and running stats to ``dtype``.

        ``device``: ``"cpu"`` (NumPy) or ``"cuda"``/``"cuda:N"`` (CuPy). A dtype given as the only
        argument is accepted too, as in ``torch.nn.Module.to``. Returns the layer.
        """
        if device is not None and dtype is None and not _looks_like_device(device):
            device, dtype = None, device
        if device is not None:
            _device.parse_device(device)
            for name in self._parameter_names:
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, _device.move(value, device))
            if self._stats is not None:
                self._stats.to(device)
            self._device = device
        if dtype is not None:
            self._dtype = _device.parse_dtype(dtype)
            for name in self._parameter_names:
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.astype(self._dtype))
            if self._stats is not None:
                self._stats.mean = self._stats.mean.astype(self._dtype)
                self._stats.var = self._stats.var.astype(self._dtype)
        return self

    def extra_repr(self) -> str:  # pragma: no cover - overridden
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def _looks_like_device(value) -> bool:
    try:
        _device.parse_device(value)
        return True
    except ValueError:
        return False
