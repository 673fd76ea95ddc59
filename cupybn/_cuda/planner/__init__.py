"""The launch planner: (op, shapes, strides, dtypes) -> kernel name, grid, block, smem, workspace, args.

One planner drives both launchers (CuPy's ``RawModule`` on a GPU, the CPU emulator in the
tests), so what the emulator proves about a plan holds for the plan that runs on the GPU.

The planner never touches memory. Arrays enter as :class:`Operand`: a buffer the launcher passes
as a pointer (a CuPy array, an emulator-allocated NumPy array, or ``None`` for a null pointer)
plus its shape, element strides and *logical* dtype name. bfloat16 buffers are 16-bit integer
arrays (neither NumPy nor CuPy has bf16), so the logical dtype travels next to the buffer.

The one list of kernel instantiations
-------------------------------------
:data:`INSTANTIATIONS` holds every ``(source file, C++ name expression)`` the planner can emit.
The NVRTC compile gate compiles exactly this list, the emulator launcher builds it, and
:func:`_instantiation` refuses to plan a kernel that is not in it, so nothing escapes the gate.

Modules
-------
The package is split by kernel family; this module re-exports every name, so callers keep writing
``planner.plan_moments(...)``, ``planner.Operand.of(...)``, ``planner.INSTANTIATIONS``:

* :mod:`.dtypes` -- the logical dtype table (``cxx_type``, ``itemsize``, ``storage_dtype``,
  ``type_code``, ``accumulation_dtype``, ``vector_width``) and the scalar parameter types;
* :mod:`.instantiations` -- the one list of kernel instantiations (:data:`INSTANTIATIONS`) with
  the name-expression and signature templates of every kernel family;
* :mod:`.launch` -- what a plan is made of: :class:`Operand`, :class:`DeviceInfo`,
  :data:`SCRATCH` / :data:`COUNTERS`, :class:`KernelLaunch`, :func:`check_args`;
* :mod:`.normalize` -- BatchNorm's normalize launch (``normalize_tiling``, heuristics in its
  docstring), eval and training forward plans;
* :mod:`.moments` -- every norm's statistics step (``moments_tiling``, the column variant,
  ``plan_moments``; heuristics in its docstring);
* :mod:`.groups` -- layer, group and instance norm forward (``GroupsLayout``, ``fused_tiling``,
  ``plan_groups_forward``; its paths in its docstring);
* :mod:`.backward` -- BatchNorm and contiguous-group norm backward plans.
"""
from .backward import (BACKWARD_THREADS, GROUPS_BACKWARD_THREADS, groups_backward_chunks, groups_backward_workspace,
                       plan_batch_norm_backward, plan_groups_backward)
from .dtypes import (FLOAT_DTYPES, SCALAR_TYPES, accumulation_dtype, cxx_type, itemsize, storage_dtype, type_code,
                     vector_width)
from .groups import (FUSED_BLOCK_VECTORS, FUSED_MAX_TEAMS, FUSED_SMEM_LIMIT, FUSED_THREADS, FUSED_WARP_VECTORS,
                     GROUP_NORMALIZE_THREADS, GroupsLayout, fused_tiling, group_norm_layout, instance_norm_layout,
                     layer_norm_layout, plan_groups_forward)
from .instantiations import (_SIGNATURES, INSTANTIATIONS, _instantiation, backward_stats_params, declared_signature,
                             instantiations_for)
from .launch import COUNTERS, SCRATCH, DeviceInfo, KernelLaunch, Operand, WorkspaceRef, check_args
from .moments import (COLUMN_LANES, COLUMN_ROWS, MOMENTS_MAX_SPLITS, MOMENTS_MIN_VECTORS_PER_THREAD, MOMENTS_THREADS,
                      MomentsTiling, column_moments_tiling, moments_tiling, plan_moments, use_column_moments)
from .normalize import (THREADS, Tiling, normalize_tiling, plan_batch_norm_eval_forward,
                        plan_batch_norm_train_forward)

__all__ = [
    # dtypes
    "FLOAT_DTYPES", "SCALAR_TYPES", "accumulation_dtype", "cxx_type", "itemsize", "storage_dtype", "type_code",
    "vector_width",
    # instantiations
    "INSTANTIATIONS", "backward_stats_params", "declared_signature", "instantiations_for",
    # launch
    "COUNTERS", "SCRATCH", "DeviceInfo", "KernelLaunch", "Operand", "WorkspaceRef", "check_args",
    # normalize
    "THREADS", "Tiling", "normalize_tiling", "plan_batch_norm_eval_forward", "plan_batch_norm_train_forward",
    # moments
    "COLUMN_LANES", "COLUMN_ROWS", "MOMENTS_MAX_SPLITS", "MOMENTS_MIN_VECTORS_PER_THREAD", "MOMENTS_THREADS",
    "MomentsTiling", "column_moments_tiling", "moments_tiling", "plan_moments", "use_column_moments",
    # groups
    "FUSED_BLOCK_VECTORS", "FUSED_MAX_TEAMS", "FUSED_SMEM_LIMIT", "FUSED_THREADS", "FUSED_WARP_VECTORS",
    "GROUP_NORMALIZE_THREADS", "GroupsLayout", "fused_tiling", "group_norm_layout", "instance_norm_layout",
    "layer_norm_layout", "plan_groups_forward",
    # backward
    "BACKWARD_THREADS", "GROUPS_BACKWARD_THREADS", "groups_backward_chunks", "groups_backward_workspace",
    "plan_batch_norm_backward", "plan_groups_backward",
]
