"""The one list of kernel instantiations.

:data:`INSTANTIATIONS` holds every ``(source file, C++ name expression)`` the planner can emit, and
``_SIGNATURES`` the parameter type codes the planner marshals for each (emulator notation, checked
against the compiled kernel by the emulator tests). The NVRTC compile gate compiles exactly this
list, the emulator launcher builds it, and :func:`_instantiation` refuses to plan a kernel that is
not in it, so nothing escapes the gate. Add here, and only here, to emit a new kernel.

The name-expression and signature templates of every kernel family live here too; the plan
modules format the templates and pass the result through :func:`_instantiation`.
"""
from __future__ import annotations

from .dtypes import FLOAT_DTYPES, accumulation_dtype, cxx_type, type_code

# ------------------------------------------------------------------------------------ batch_norm.cu, moments.cu

_NORMALIZE = "cupybn::batch_norm_normalize<{T}, {S}, {P}, cupybn::{kind}>"
_NORMALIZE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "p:{S}", "p:{S}", "p:{P}", "p:{P}", "{A}",
                        "p:{S}")


def _normalize_expression(x: str, stats: str, params: str, kind: str) -> str:
    return _NORMALIZE.format(T=cxx_type(x), S=cxx_type(stats), P=cxx_type(params), kind=kind)


def _normalize_signature(x: str, stats: str, params: str) -> tuple[str, ...]:
    codes = dict(T=type_code(x), S=type_code(stats), P=type_code(params), A=type_code(accumulation_dtype(x)))
    return tuple(c.format(**codes) for c in _NORMALIZE_SIGNATURE)


_MOMENTS = "cupybn::moments_forward<{T}, {R}>"
_MOMENTS_COLUMNS = "cupybn::moments_columns<{T}, {R}>"
_MOMENTS_SIGNATURE = ("p:{T}", "i64", "i64", "i64", "i64", "i32", "p:{A}", "p:{A}", "p:{A}", "{A}",
                      "p:{R}", "p:{R}", "p:i64", "f64", "i32", "p:void", "p:u32")


def _moments_expression(x: str, running: str, columns: bool = False) -> str:
    return (_MOMENTS_COLUMNS if columns else _MOMENTS).format(T=cxx_type(x), R=cxx_type(running))


def _moments_signature(x: str, running: str) -> tuple[str, ...]:
    codes = dict(T=type_code(x), R=type_code(running), A=type_code(accumulation_dtype(x)))
    return tuple(c.format(**codes) for c in _MOMENTS_SIGNATURE)


# ------------------------------------------------------------------------------------ fused_groups.cu

_FUSED = "cupybn::fused_groups<{T}, {P}, {R}>"
_FUSED_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{P}", "p:{P}", "{A}", "i32", "i32",
                    "p:void", "p:void", "i32", "f64", "p:void", "p:u32")
_GROUP_NORMALIZE = "cupybn::normalize_groups<{T}, {P}>"
_GROUP_NORMALIZE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{A}", "p:{A}", "p:{A}",
                              "p:{P}", "p:{P}")


def _codes(x: str, p: str) -> dict:
    return dict(T=type_code(x), P=type_code(p), A=type_code(accumulation_dtype(x)))


# ------------------------------------------------------------------------------------ batch_norm_backward.cu

_BN_BACKWARD_REDUCE = "cupybn::batch_norm_backward_reduce<{T}, {S}, {P}>"
_BN_BACKWARD_REDUCE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i32", "p:{S}", "p:{S}", "i32", "{A}",
                                 "p:{A}", "p:{P}", "p:{P}", "p:void", "p:u32")
_BN_BACKWARD_DX = "cupybn::batch_norm_backward_dx<{T}, {S}, {P}>"
_BN_BACKWARD_DX_SIGNATURE = ("p:{T}", "p:{T}", "p:{T}", "i64", "i64", "i64", "p:{S}", "p:{S}", "i32", "p:{P}",
                             "{A}", "p:{A}", "{A}", "i32")


def backward_stats_params(x: str) -> tuple[tuple[str, str], ...]:
    """The ``(stats dtype, parameter dtype)`` pairs the BatchNorm backward kernels are instantiated
    for, given ``x``'s dtype: saved statistics in the accumulation dtype with a weight of any float
    dtype (training), and running statistics of the weight's dtype (eval). Other combinations are
    converted to ``(accumulation dtype, weight dtype)`` by the caller."""
    acc = accumulation_dtype(x)
    pairs = [(acc, p) for p in FLOAT_DTYPES] + [(p, p) for p in FLOAT_DTYPES if p != acc]
    return tuple(pairs)


# ------------------------------------------------------------------------------------ groups_backward.cu

_GB_REDUCE = "cupybn::groups_backward_reduce<{T}, {P}>"
_GB_REDUCE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{A}", "p:{A}", "p:{P}", "p:{A}")
_GB_DX = "cupybn::groups_backward_dx<{T}, {P}>"
_GB_DX_SIGNATURE = ("p:{T}", "p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{A}", "p:{A}", "p:{P}", "p:{A}")
_GB_PARTIAL = "cupybn::groups_backward_param_partial<{T}>"
_GB_PARTIAL_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{A}", "p:{A}", "i64", "p:{A}")
_GB_COMBINE = "cupybn::groups_backward_param_combine<{T}, {P}>"  # T: the accumulation type here
_GB_COMBINE_SIGNATURE = ("p:{A}", "i64", "i64", "p:{P}", "p:{P}")


# ------------------------------------------------------------------------------------ the one list

def _build_instantiations() -> dict[tuple[str, str], tuple[str, ...]]:
    table = {}
    # BatchNorm eval forward: x of any float dtype, running stats and affine parameters of any
    # (one) float dtype -- same as x, wider (mixed precision) or narrower (f64 x, f32 layer).
    for x in FLOAT_DTYPES:
        for p in FLOAT_DTYPES:
            table[("batch_norm.cu", _normalize_expression(x, p, p, "kRunningVar"))] = _normalize_signature(x, p, p)
    # Training forward, normalize step: statistics saved in the accumulation dtype (kInvStd),
    # affine parameters of any float dtype.
    for x in FLOAT_DTYPES:
        a = accumulation_dtype(x)
        for p in FLOAT_DTYPES:
            table[("batch_norm.cu", _normalize_expression(x, a, p, "kInvStd"))] = _normalize_signature(x, a, p)
    # Statistics step (moments.cu): x of any float dtype, running statistics of any float dtype
    # (without running statistics the planner picks R = the accumulation dtype).
    for x in FLOAT_DTYPES:
        for r in FLOAT_DTYPES:
            table[("moments.cu", _moments_expression(x, r))] = _moments_signature(x, r)
            table[("moments.cu", _moments_expression(x, r, columns=True))] = _moments_signature(x, r)
    # Layer, group and instance norm forward (fused_groups.cu): x of any float dtype x affine
    # parameters of any (one) float dtype; running statistics (instance norm) of any float dtype
    # are handled at run time (RunningType), not by instantiation.
    for x in FLOAT_DTYPES:
        for p in FLOAT_DTYPES:
            names = dict(T=cxx_type(x), P=cxx_type(p))
            # warp per group (registers; not for float64: ptxas calls its double-division slow
            # path with a stack frame there) / block per group
            for registers in ("true", "false") if x != "float64" else ("false",):
                table[("fused_groups.cu", _FUSED.format(R=registers, **names))] = tuple(
                    c.format(**_codes(x, p)) for c in _FUSED_SIGNATURE)
            table[("fused_groups.cu", _GROUP_NORMALIZE.format(**names))] = tuple(
                c.format(**_codes(x, p)) for c in _GROUP_NORMALIZE_SIGNATURE)
    # BatchNorm backward: one reduce and one dx kernel per (x, stats, parameter) dtype triple.
    for x in FLOAT_DTYPES:
        for s, p in backward_stats_params(x):
            names = dict(T=cxx_type(x), S=cxx_type(s), P=cxx_type(p))
            codes = dict(T=type_code(x), S=type_code(s), P=type_code(p), A=type_code(accumulation_dtype(x)))
            table[("batch_norm_backward.cu", _BN_BACKWARD_REDUCE.format(**names))] = tuple(
                c.format(**codes) for c in _BN_BACKWARD_REDUCE_SIGNATURE)
            table[("batch_norm_backward.cu", _BN_BACKWARD_DX.format(**names))] = tuple(
                c.format(**codes) for c in _BN_BACKWARD_DX_SIGNATURE)
    # Group norms backward (layer, group, instance norm).
    src = "groups_backward.cu"
    for x in FLOAT_DTYPES:
        for p in FLOAT_DTYPES:
            names = dict(T=cxx_type(x), P=cxx_type(p))
            table[(src, _GB_REDUCE.format(**names))] = tuple(c.format(**_codes(x, p)) for c in _GB_REDUCE_SIGNATURE)
            table[(src, _GB_DX.format(**names))] = tuple(c.format(**_codes(x, p)) for c in _GB_DX_SIGNATURE)
        table[(src, _GB_PARTIAL.format(T=cxx_type(x)))] = tuple(
            c.format(**_codes(x, x)) for c in _GB_PARTIAL_SIGNATURE)
    for a in ("float32", "float64"):
        for p in FLOAT_DTYPES:
            table[(src, _GB_COMBINE.format(T=cxx_type(a), P=cxx_type(p)))] = tuple(
                c.format(**_codes(a, p)) for c in _GB_COMBINE_SIGNATURE)
    return table


# (source, name expression) -> parameter type codes the planner passes (checked against the
# compiled kernel by the emulator tests). Add here, and only here, to emit a new kernel.
_SIGNATURES: dict[tuple[str, str], tuple[str, ...]] = _build_instantiations()

#: Every kernel instantiation the planner can emit, as ``(source file, name expression)``.
INSTANTIATIONS: tuple[tuple[str, str], ...] = tuple(_SIGNATURES)


def instantiations_for(source: str) -> tuple[str, ...]:
    """Name expressions of :data:`INSTANTIATIONS` that live in ``source``."""
    return tuple(k for s, k in INSTANTIATIONS if s == source)


def declared_signature(source: str, kernel: str) -> tuple[str, ...]:
    """The parameter type codes the planner marshals for ``kernel`` (emulator notation)."""
    return _SIGNATURES[(source, kernel)]


def _instantiation(source: str, kernel: str) -> tuple[str, str]:
    if (source, kernel) not in _SIGNATURES:
        raise AssertionError(f"planner emitted {kernel} from {source}, which is not in INSTANTIATIONS "
                             "(the compile gate would never have checked it)")
    return source, kernel
