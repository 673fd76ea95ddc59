"""cupybn's GPU path: hand-written CUDA kernels (``kernels/*.cu``) compiled at run time by NVRTC.

Modules:

* ``planner``   -- turns (op, shapes, strides, dtypes) into kernel launches; holds the one list of
  kernel instantiations (``planner.INSTANTIATIONS``) and the launch heuristics;
* ``launchers`` -- the CuPy ``RawModule`` launcher (the emulator launcher lives in the tests);
* ``interop``   -- DLPack / stream handling for CuPy arrays, CUDA torch tensors, other producers;
* ``source``    -- where the ``.cu`` files are, and the NVRTC options.

Importing this package imports neither CuPy nor torch.
"""
from __future__ import annotations

from .interop import is_gpu_array

__all__ = ["batch_norm_forward", "is_gpu_array"]


def batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """GPU path of ``cupybn.batch_norm``.

    ``input`` is a ``cupy.ndarray``, a CUDA ``torch.Tensor`` or another CUDA ``__dlpack__``
    producer; the other arrays are on the same device, any framework, or ``None``. Arguments are
    already validated (shapes, dtypes, rank >= 2, eps >= 0). Returns the output in the input's
    framework and dtype, computed on the current stream (torch's current stream for torch input,
    CuPy's otherwise) without a host sync.

    Eval (``training=False`` with running statistics) is one kernel launch:
    ``y = (x - running_mean) * (1 / sqrt(running_var + eps) * weight) + bias``. Non-contiguous
    input is made contiguous first; parameters of mixed dtypes are widened to one dtype.
    Training, and eval without running statistics, raise ``NotImplementedError`` (issue 4).
    """
    del momentum  # used by the training forward (issue 4)
    if training:
        raise NotImplementedError("BatchNorm training forward on the GPU path (issue 4)")
    if running_mean is None or running_var is None:
        raise NotImplementedError("BatchNorm forward with batch statistics (no running statistics) "
                                  "on the GPU path (issue 4)")
    from . import interop, planner
    from .launchers import cupy_launcher

    launcher = cupy_launcher()
    with interop.input_stream(input):
        x, x_dtype = interop.as_cupy(input, "input")  # zero-copy view, any strides
        x = interop.contiguous(x)  # a copy (on this stream) only when x is not C-contiguous
        params = {name: interop.as_cupy(a, name) for name, a in (
            ("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))}
        # One parameter dtype for the kernel: mixed dtypes are widened (exactly) to the widest.
        param_dtype = interop.promote(d for _, d in params.values())
        ops = {name: None if arr is None else
               planner.Operand.of(interop.contiguous(interop.cast(arr, d, param_dtype)), param_dtype)
               for name, (arr, d) in params.items()}
        native, y = interop.empty_output(input, x, x_dtype)
        plan = planner.plan_batch_norm_eval_forward(
            planner.Operand.of(x, x_dtype), planner.Operand.of(y, x_dtype),
            ops["running_mean"], ops["running_var"], ops["weight"], ops["bias"], eps,
            device=launcher.device_info())
        launcher.launch(plan)
    return interop.to_native(input, native)
