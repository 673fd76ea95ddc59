"""Drop-in replacements for the ``torch.nn`` norms, differentiable, computed by cupybn.

``import cupybn.torch`` needs PyTorch (``import cupybn`` does not import it). It provides:

* ``BatchNorm1d/2d/3d``, ``InstanceNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``: subclasses of the
  ``torch.nn`` classes of the same names, so constructors, ``Parameter`` s, buffers,
  ``state_dict`` (keys, ``num_batches_tracked``, versioned loading), ``reset_parameters``,
  ``extra_repr`` and ``isinstance`` checks are torch's own. Only ``forward`` differs: it runs
  through a ``torch.autograd.Function`` whose forward is cupybn's
  (:func:`cupybn.native_batch_norm`, ...) and whose backward is cupybn's
  (:func:`cupybn.batch_norm_backward`, ...), with the saved ``mean`` / ``invstd`` passed from
  forward to backward (statistics are never recomputed).
* ``batch_norm``, ``instance_norm``, ``layer_norm``, ``group_norm``: differentiable functional
  forms with the signatures of ``torch.nn.functional``.
* :func:`convert`: swaps every ``torch.nn`` norm in a model for the cupybn one.

Running statistics follow torch exactly, because the modules keep torch's bookkeeping:
``momentum=None`` is the cumulative average ``1 / num_batches_tracked`` (this batch included, as
torch does), InstanceNorm never counts batches and reads ``momentum=None`` as 0, eval
mode normalizes with the running statistics when they are tracked, and
``track_running_stats=False`` uses batch statistics in both modes. One difference, the error
contract of API.md ("stricter than torch"): a call that raises changes nothing, so
``num_batches_tracked`` is incremented only after the forward has succeeded (torch increments
it first), and arguments of the wrong type (``training="no"``, ``momentum="0.1"``) are a
``TypeError`` naming the argument.

Where the work runs: CPU tensors use cupybn's array-API reference path, in torch. CUDA tensors go
to cupybn's GPU path, which has no ``native_*`` forward / backward kernels yet: they raise
``NotImplementedError`` naming the missing kernel (the forward-only :mod:`cupybn` functions do run
on the GPU). Double backward is not supported (the backward is ``once_differentiable``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _checks, native
from . import functional as _F

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm",
    "batch_norm", "instance_norm", "layer_norm", "group_norm", "convert",
]


# ----------------------------------------------------------------------- autograd functions

class _BatchNormFunction(torch.autograd.Function):
    """Batch norm (and instance norm on running statistics): cupybn forward and backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps,
                instance=False):
        out, save_mean, save_invstd = native.native_batch_norm(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.training, ctx.eps, ctx.instance = training, eps, instance
        if training:
            ctx.save_for_backward(input, weight, save_mean, save_invstd)
        else:  # copies: a later training call may update the buffers before this backward runs
            ctx.save_for_backward(input, weight, running_mean.clone(), running_var.clone())
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, a, b = ctx.saved_tensors
        mask = ctx.needs_input_grad[:3]
        if ctx.training:
            grads = native.batch_norm_backward(grad_output, input, weight, None, None, a, b, True,
                                               ctx.eps, mask)
        elif ctx.instance:  # grad_weight summed per sample, as ATen's instance norm
            grads = native.instance_norm_backward(grad_output, input, weight, a, b, None, None,
                                                  False, ctx.eps, mask)
        else:
            grads = native.batch_norm_backward(grad_output, input, weight, a, b, None, None, False,
                                               ctx.eps, mask)
        return (*grads, None, None, None, None, None, None)


class _InstanceNormFunction(torch.autograd.Function):
    """Instance norm on per-instance statistics: cupybn forward and backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        out, save_mean, save_invstd = native.native_instance_norm(
            input, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.eps = eps
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        grads = native.instance_norm_backward(grad_output, input, weight, None, None, save_mean,
                                              save_invstd, True, ctx.eps, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, normalized_shape, weight, bias, eps):
        out, mean, rstd = native.native_layer_norm(input, normalized_shape, weight, bias, eps)
        ctx.normalized_shape = normalized_shape
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, bias, mean, rstd = ctx.saved_tensors
        n = ctx.needs_input_grad
        gi, gw, gb = native.layer_norm_backward(grad_output, input, ctx.normalized_shape, mean,
                                                rstd, weight, bias, (n[0], n[2], n[3]))
        return gi, None, gw, gb, None


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps):
        out, mean, rstd = native.native_group_norm(input, num_groups, weight, bias, eps)
        ctx.num_groups = num_groups
        ctx.save_for_backward(input, weight, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, rstd = ctx.saved_tensors
        n = ctx.needs_input_grad
        gi, gw, gb = native.group_norm_backward(grad_output, input, mean, rstd, weight,
                                                ctx.num_groups, (n[0], n[2], n[3]))
        return gi, None, gw, gb, None


# ------------------------------------------------------------------------------- functional

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Differentiable ``torch.nn.functional.batch_norm`` computed by cupybn (running stats in place)."""
    if momentum is None:
        momentum = 0.0  # torch's functional form does the same: the module computes the factor
    return _BatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                    _checks.check_bool(training, "training"), momentum, eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """Differentiable ``torch.nn.functional.instance_norm`` computed by cupybn."""
    momentum = 0.0 if momentum is None else momentum
    if not _checks.check_bool(use_input_stats, "use_input_stats"):
        return _BatchNormFunction.apply(input, weight, bias, running_mean, running_var, False,
                                        momentum, eps, True)
    return _InstanceNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Differentiable ``torch.nn.functional.layer_norm`` computed by cupybn."""
    return _LayerNormFunction.apply(input, _F._normalized_shape(normalized_shape), weight, bias, eps)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Differentiable ``torch.nn.functional.group_norm`` computed by cupybn."""
    return _GroupNormFunction.apply(input, _checks.check_int(num_groups, "num_groups", 1), weight,
                                    bias, eps)


# ---------------------------------------------------------------------------------- modules

def _batch_norm_forward(self, input):
    """``torch.nn.modules.batchnorm._BatchNorm.forward`` with cupybn doing the math.

    Unlike torch, ``num_batches_tracked`` is incremented after the call succeeds: a call that
    raises changes nothing (API.md, "Errors"). The cumulative factor is the same as torch's:
    ``1 / (num_batches_tracked + 1)``, the count this call brings it to.
    """
    self._check_input_dim(input)
    factor = 0.0 if self.momentum is None else self.momentum
    count = self.training and self.track_running_stats and self.num_batches_tracked is not None
    if count:
        _checks.check_writable(self.num_batches_tracked, "num_batches_tracked")
        if self.momentum is None:
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)
    bn_training = self.training or (self.running_mean is None and self.running_var is None)
    keep = not self.training or self.track_running_stats
    out = batch_norm(input, self.running_mean if keep else None,
                     self.running_var if keep else None, self.weight, self.bias, bn_training,
                     factor, self.eps)
    if count:
        self.num_batches_tracked.add_(1)
    return out


class BatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by cupybn (forward and backward); same state_dict."""

    forward = _batch_norm_forward


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by cupybn (forward and backward); same state_dict."""

    forward = _batch_norm_forward


class BatchNorm3d(nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by cupybn (forward and backward); same state_dict."""

    forward = _batch_norm_forward


def _apply_instance_norm(self, input):
    """``torch.nn.modules.instancenorm._InstanceNorm._apply_instance_norm`` through cupybn."""
    return instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or not self.track_running_stats,
                         self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` computed by cupybn (forward and backward); same state_dict."""

    _apply_instance_norm = _apply_instance_norm


class InstanceNorm2d(nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` computed by cupybn (forward and backward); same state_dict."""

    _apply_instance_norm = _apply_instance_norm


class InstanceNorm3d(nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` computed by cupybn (forward and backward); same state_dict."""

    _apply_instance_norm = _apply_instance_norm


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by cupybn (forward and backward); same state_dict."""

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by cupybn (forward and backward); same state_dict."""

    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


# ---------------------------------------------------------------------------------- convert

_REPLACEMENTS = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d,
    nn.InstanceNorm3d: InstanceNorm3d, nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm,
}


def _replacement(module: nn.Module) -> nn.Module:
    cls = _REPLACEMENTS[type(module)]
    if isinstance(module, nn.modules.batchnorm._NormBase):
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats, bias=module.bias is not None or not module.affine)
    elif isinstance(module, nn.LayerNorm):
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine,
                  bias=module.bias is not None or not module.elementwise_affine)
    else:
        new = cls(module.num_groups, module.num_channels, module.eps, module.affine,
                  bias=module.bias is not None or not module.affine)
    # Carry the original's Parameter and buffer objects over, as
    # torch.nn.SyncBatchNorm.convert_sync_batchnorm does: an optimizer built before the
    # conversion keeps updating the model's parameters.
    for name, p in module._parameters.items():
        new._parameters[name] = p
    for name, b in module._buffers.items():
        new._buffers[name] = b
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert(module: nn.Module) -> nn.Module:
    """Swap every ``torch.nn`` norm in ``module`` (itself included, nested ones too) for cupybn's.

    Replaced: modules whose type is exactly ``torch.nn.BatchNorm1d/2d/3d``,
    ``InstanceNorm1d/2d/3d``, ``LayerNorm`` or ``GroupNorm`` (subclasses are left alone: they
    may define their own forward; ``SyncBatchNorm`` and the lazy norms too). Like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, the new modules take over the original's
    ``Parameter`` and buffer objects (same values, dtypes and devices; an optimizer built before
    the conversion keeps working), its training mode and ``qconfig``; hooks are not carried
    over. Children are replaced in place; the return value is ``module`` itself, or its
    replacement when ``module`` is a norm. ``copy.deepcopy`` the model first to keep an
    independent torch original.

    Example::

        model = cupybn.torch.convert(torchvision.models.resnet18())
    """
    out = _replacement(module) if type(module) in _REPLACEMENTS else module
    for name, child in module.named_children():
        out.add_module(name, convert(child))
    return out
