"""cupybn.batch_norm / instance_norm / layer_norm / group_norm against the float64 oracle and torch.

Parametrized over backend (numpy, torch CPU, array_api_strict) x dtype x shape.
The first tests validate the oracle itself against torch.nn.functional (no cupybn needed).
"""
import numpy as np
import pytest

import oracle
from conftest import (
    DTYPES,
    assert_close,
    dtype_name,
    is_backend,
    make_affine,
    make_input,
    make_running,
    param_dtype_for,
    require,
    round_to,
    snapshot,
    to_backend,
    to_f64,
    torch,
)

BN_SHAPES = [(8, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4), (3, 5, 7, 11), (1, 4, 9), (5, 2, 1)]
IN_SHAPES = [(4, 3, 5), (2, 3, 4, 5), (2, 2, 3, 3, 2), (1, 3, 7), (3, 2, 2), (2, 3, 1, 5)]
LN_CASES = [((4, 5), (5,)), ((2, 3, 4), (3, 4)), ((2, 3, 4), (4,)), ((7,), (7,)), ((2, 3, 4, 5), (3, 4, 5)),
            ((3, 1), (1,)), ((1, 2, 9), (2, 9)), ((5, 33), (33,))]
GN_CASES = [((4, 6, 5), 3), ((2, 6), 2), ((2, 4, 3, 3), 1), ((2, 4, 3, 3), 4), ((3, 6, 2, 2, 2), 2),
            ((2, 3), 3), ((1, 4, 7), 2)]
AFFINE = ["none", "both", "weight", "bias"]


def _affine_args(rng, C, pdt, affine):
    w, b = make_affine(rng, C, pdt)
    if affine in ("none", "bias"):
        w = None
    if affine in ("none", "weight"):
        b = None
    return w, b


def _tb(a, backend, dtype):
    return None if a is None else to_backend(a, backend, dtype)


def _check_out(y, backend, dtype, shape):
    assert is_backend(y, backend), f"output type {type(y)} is not a {backend} array"
    assert dtype_name(y) == dtype, f"output dtype {dtype_name(y)} != input dtype {dtype}"
    assert tuple(y.shape) == tuple(shape)


# ============================================================================ oracle sanity vs torch

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


@needs_torch
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_oracle_batch_norm_matches_torch(rng, seed, shape, training):
    C = shape[1]
    x = make_input(rng, shape, "float64")
    w, b = make_affine(rng, C, "float64")
    rm, rv = make_running(rng, C, "float64")
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    yt = torch.nn.functional.batch_norm(torch.tensor(x), trm, trv, torch.tensor(w), torch.tensor(b),
                                        training=training, momentum=0.3, eps=1e-5)
    y, rm2, rv2 = oracle.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-5)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-12, atol=1e-12, err_msg=f"seed={seed}")
    np.testing.assert_allclose(rm2, trm.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv2, trv.numpy(), rtol=1e-12, atol=1e-14)


@needs_torch
def test_oracle_batch_norm_eps0_matches_aten(rng):
    # F.batch_norm refuses eps<=0 in training; ATen's op itself gives invstd = 0 for var == 0
    x = make_input(rng, (6, 4, 3), "float64")
    x[:, 2] = 1.5
    rm, rv = np.zeros(4), np.ones(4)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    yt = torch.batch_norm(torch.tensor(x), None, torch.full((4,), 0.25, dtype=torch.float64),
                          trm, trv, True, 0.1, 0.0, False)
    y, rm2, rv2 = oracle.batch_norm(x, rm, rv, None, np.full(4, 0.25), True, 0.1, 0.0)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-12, atol=1e-12)
    assert np.all(y[:, 2] == 0.25)
    np.testing.assert_allclose(rv2, trv.numpy(), rtol=1e-12)


@needs_torch
@pytest.mark.parametrize("shape", IN_SHAPES)
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_oracle_instance_norm_matches_torch(rng, seed, shape, use_input_stats):
    C = shape[1]
    x = make_input(rng, shape, "float64")
    w, b = make_affine(rng, C, "float64")
    rm, rv = make_running(rng, C, "float64")
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    if use_input_stats and np.prod(shape[2:]) == 1:
        pytest.skip("torch refuses one spatial element")
    yt = torch.nn.functional.instance_norm(torch.tensor(x), trm, trv, torch.tensor(w), torch.tensor(b),
                                           use_input_stats=use_input_stats, momentum=0.3, eps=1e-5)
    y, rm2, rv2 = oracle.instance_norm(x, rm, rv, w, b, use_input_stats, 0.3, 1e-5)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-12, atol=1e-12, err_msg=f"seed={seed}")
    np.testing.assert_allclose(rm2, trm.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv2, trv.numpy(), rtol=1e-12, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("case", LN_CASES)
def test_oracle_layer_norm_matches_torch(rng, seed, case):
    shape, ns = case
    x = make_input(rng, shape, "float64")
    w = rng.uniform(0.5, 1.5, ns)
    b = rng.uniform(-0.5, 0.5, ns)
    yt = torch.nn.functional.layer_norm(torch.tensor(x), ns, torch.tensor(w), torch.tensor(b), eps=1e-5)
    y = oracle.layer_norm(x, ns, w, b, 1e-5)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-11, atol=1e-11, err_msg=f"seed={seed}")


@needs_torch
@pytest.mark.parametrize("case", GN_CASES)
def test_oracle_group_norm_matches_torch(rng, seed, case):
    shape, G = case
    x = make_input(rng, shape, "float64")
    w, b = make_affine(rng, shape[1], "float64")
    yt = torch.nn.functional.group_norm(torch.tensor(x), G, torch.tensor(w), torch.tensor(b), eps=1e-5)
    y = oracle.group_norm(x, G, w, b, 1e-5)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-11, atol=1e-11, err_msg=f"seed={seed}")


@needs_torch
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_oracle_module_sequence_matches_torch(rng, momentum):
    bn_t = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    bn_o = oracle.BatchNormOracle(3, momentum=momentum)
    in_t = torch.nn.InstanceNorm1d(3, momentum=momentum, track_running_stats=True, dtype=torch.float64)
    in_o = oracle.InstanceNormOracle(3, momentum=momentum, track_running_stats=True)
    for step in range(5):
        if step == 3:
            for m in (bn_t, bn_o, in_t, in_o):
                if hasattr(m, "eval"):
                    m.eval()
                else:
                    m.training = False
        x = make_input(rng, (4, 3, 2, 5), "float64")
        np.testing.assert_allclose(bn_o(x), bn_t(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn_o.running_mean, bn_t.running_mean.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bn_o.running_var, bn_t.running_var.numpy(), rtol=1e-12, atol=1e-14)
        assert bn_o.num_batches_tracked == int(bn_t.num_batches_tracked)
        xi = make_input(rng, (4, 3, 6), "float64")
        np.testing.assert_allclose(in_o(xi), in_t(torch.tensor(xi)).detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(in_o.running_mean, in_t.running_mean.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(in_o.running_var, in_t.running_var.numpy(), rtol=1e-12, atol=1e-14)


def test_oracle_bf16_rounding_matches_torch():
    if torch is None:
        pytest.skip("torch not installed")
    v = np.random.default_rng(0).standard_normal(10000) * 100
    t = torch.tensor(v, dtype=torch.float32).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_to(v.astype(np.float32), "bfloat16"), t)


# ============================================================================ batch_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("with_stats", [True, False])
def test_batch_norm_training(cupybn, backend, dtype, shape, affine, with_stats, rng, seed):
    require(backend, dtype)
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x64 = make_input(rng, shape, dtype)
    w, b = _affine_args(rng, C, pdt, affine)
    rm, rv = make_running(rng, C, pdt) if with_stats else (None, None)
    RM, RV = _tb(rm, backend, pdt), _tb(rv, backend, pdt)
    y = cupybn.batch_norm(to_backend(x64, backend, dtype), RM, RV, _tb(w, backend, pdt), _tb(b, backend, pdt),
                          training=True, momentum=0.3, eps=1e-5)
    _check_out(y, backend, dtype, shape)
    ye, rme, rve = oracle.batch_norm(x64, rm, rv, w, b, True, 0.3, 1e-5)
    assert_close(y, ye, dtype, "batch_norm output", seed)
    if with_stats:
        # in place: the very objects passed hold the new values, dtype unchanged
        assert dtype_name(RM) == pdt and dtype_name(RV) == pdt
        assert_close(RM, rme, pdt, "running_mean (in place)", seed)
        assert_close(RV, rve, pdt, "running_var (in place)", seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("affine", ["none", "both"])
def test_batch_norm_eval(cupybn, backend, dtype, shape, affine, rng, seed):
    require(backend, dtype)
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x64 = make_input(rng, shape, dtype)
    w, b = _affine_args(rng, C, pdt, affine)
    rm, rv = make_running(rng, C, pdt)
    RM, RV = _tb(rm, backend, pdt), _tb(rv, backend, pdt)
    before = snapshot(RM, RV)
    y = cupybn.batch_norm(to_backend(x64, backend, dtype), RM, RV, _tb(w, backend, pdt), _tb(b, backend, pdt),
                          training=False, momentum=0.3, eps=1e-5)
    _check_out(y, backend, dtype, shape)
    ye, _, _ = oracle.batch_norm(x64, rm, rv, w, b, False, 0.3, 1e-5)
    assert_close(y, ye, dtype, "batch_norm eval output", seed)
    assert snapshot(RM, RV) == before, "eval must not touch the running statistics"


@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0, 0.0])
@pytest.mark.parametrize("eps", [1e-5, 0.0, 0.5])
def test_batch_norm_training_sequence_in_place(cupybn, backend, momentum, eps, rng, seed):
    require(backend)
    shape = (6, 4, 5)
    rm, rv = np.zeros(4), np.ones(4)
    RM, RV = to_backend(rm, backend, "float32"), to_backend(rv, backend, "float32")
    w, b = make_affine(rng, 4, "float32")
    W, B = to_backend(w, backend, "float32"), to_backend(b, backend, "float32")
    for step in range(4):
        x64 = make_input(rng, shape, "float32")
        y = cupybn.batch_norm(to_backend(x64, backend, "float32"), RM, RV, W, B, training=True,
                              momentum=momentum, eps=eps)
        ye, rm, rv = oracle.batch_norm(x64, rm, rv, w, b, True, momentum, eps)
        rm, rv = round_to(rm, "float32"), round_to(rv, "float32")
        assert_close(y, ye, "float32", f"output step {step}", seed)
        assert_close(RM, rm, "float32", f"running_mean step {step}", seed)
        assert_close(RV, rv, "float32", f"running_var step {step}", seed)
    x64 = make_input(rng, shape, "float32")
    y = cupybn.batch_norm(to_backend(x64, backend, "float32"), RM, RV, W, B, training=False, eps=eps)
    assert_close(y, oracle.batch_norm(x64, rm, rv, w, b, False, 0.1, eps)[0], "float32", "eval", seed)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)])
def test_batch_norm_vs_torch(cupybn, dtype, training, shape, rng, seed):
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x = to_backend(make_input(rng, shape, dtype), "torch", dtype)
    w, b = (to_backend(a, "torch", pdt) for a in make_affine(rng, C, pdt))
    rm, rv = (to_backend(a, "torch", pdt) for a in make_running(rng, C, pdt))
    trm, trv = rm.clone(), rv.clone()
    yt = torch.nn.functional.batch_norm(x, trm, trv, w, b, training=training, momentum=0.2, eps=1e-4)
    y = cupybn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2, eps=1e-4)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype
    assert_close(y, to_f64(yt), dtype, "vs torch", seed, k=3)
    assert_close(rm, to_f64(trm), pdt, "running_mean vs torch", seed)
    assert_close(rv, to_f64(trv), pdt, "running_var vs torch", seed)


# ============================================================================ mixed precision

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_batch_norm_half_params_same_dtype(cupybn, backend, dtype, rng, seed):
    """float16 parameters and running stats with float16 input work; stats stay float16."""
    require(backend, dtype)
    shape, C = (6, 3, 7), 3
    x64 = make_input(rng, shape, dtype)
    w, b = make_affine(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    RM, RV = to_backend(rm, backend, dtype), to_backend(rv, backend, dtype)
    y = cupybn.batch_norm(to_backend(x64, backend, dtype), RM, RV, to_backend(w, backend, dtype),
                          to_backend(b, backend, dtype), training=True, momentum=0.1, eps=1e-5)
    _check_out(y, backend, dtype, shape)
    ye, rme, rve = oracle.batch_norm(x64, rm, rv, w, b, True, 0.1, 1e-5)
    assert_close(y, ye, dtype, "output", seed)
    assert dtype_name(RM) == dtype and dtype_name(RV) == dtype
    assert_close(RM, rme, dtype, "running_mean", seed)
    assert_close(RV, rve, dtype, "running_var", seed)


def test_float64_input_through_float32_params(cupybn, backend, rng, seed):
    """A narrower parameter dtype works and returns float64 (torch refuses this)."""
    require(backend)
    shape, C = (5, 4, 6), 4
    x64 = make_input(rng, shape, "float64")
    w, b = make_affine(rng, C, "float32")
    rm, rv = make_running(rng, C, "float32")
    RM, RV = to_backend(rm, backend, "float32"), to_backend(rv, backend, "float32")
    y = cupybn.batch_norm(to_backend(x64, backend, "float64"), RM, RV, to_backend(w, backend, "float32"),
                          to_backend(b, backend, "float32"), training=True, momentum=0.1, eps=1e-5)
    _check_out(y, backend, "float64", shape)
    ye, rme, rve = oracle.batch_norm(x64, rm, rv, w, b, True, 0.1, 1e-5)
    assert_close(y, ye, "float64", "output (float64 accumulation)", seed)
    assert dtype_name(RM) == "float32"
    assert_close(RM, rme, "float32", "running_mean", seed)
    assert_close(RV, rve, "float32", "running_var", seed)
    y = cupybn.layer_norm(to_backend(x64, backend, "float64"), (6,), to_backend(np.ones(6), backend, "float32"))
    _check_out(y, backend, "float64", shape)
    assert_close(y, oracle.layer_norm(x64, (6,), None, None), "float64", "layer_norm", seed)


# ============================================================================ instance_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IN_SHAPES)
@pytest.mark.parametrize("affine", ["none", "both"])
@pytest.mark.parametrize("with_stats", [True, False])
def test_instance_norm(cupybn, backend, dtype, shape, affine, with_stats, rng, seed):
    require(backend, dtype)
    if np.prod(shape[2:]) == 1:
        pytest.skip("one spatial element: error case, tested in test_errors")
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x64 = make_input(rng, shape, dtype)
    w, b = _affine_args(rng, C, pdt, affine)
    rm, rv = make_running(rng, C, pdt) if with_stats else (None, None)
    RM, RV = _tb(rm, backend, pdt), _tb(rv, backend, pdt)
    y = cupybn.instance_norm(to_backend(x64, backend, dtype), RM, RV, _tb(w, backend, pdt), _tb(b, backend, pdt),
                             use_input_stats=True, momentum=0.3, eps=1e-5)
    _check_out(y, backend, dtype, shape)
    ye, rme, rve = oracle.instance_norm(x64, rm, rv, w, b, True, 0.3, 1e-5)
    assert_close(y, ye, dtype, "instance_norm output", seed)
    if with_stats:
        assert_close(RM, rme, pdt, "running_mean (in place)", seed)
        assert_close(RV, rve, pdt, "running_var (in place)", seed)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 4, 5), (2, 3, 1, 1)])
def test_instance_norm_running_stats_eval(cupybn, backend, dtype, shape, rng, seed):
    require(backend, dtype)
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x64 = make_input(rng, shape, dtype)
    rm, rv = make_running(rng, C, pdt)
    RM, RV = to_backend(rm, backend, pdt), to_backend(rv, backend, pdt)
    before = snapshot(RM, RV)
    y = cupybn.instance_norm(to_backend(x64, backend, dtype), RM, RV, use_input_stats=False, eps=1e-5)
    _check_out(y, backend, dtype, shape)
    assert_close(y, oracle.instance_norm(x64, rm, rv, None, None, False, 0.1, 1e-5)[0], dtype, "eval", seed)
    assert snapshot(RM, RV) == before


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 4, 5), (2, 2, 3, 3, 2)])
def test_instance_norm_vs_torch(cupybn, dtype, shape, rng, seed):
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x = to_backend(make_input(rng, shape, dtype), "torch", dtype)
    w, b = (to_backend(a, "torch", pdt) for a in make_affine(rng, C, pdt))
    rm, rv = (to_backend(a, "torch", pdt) for a in make_running(rng, C, pdt))
    trm, trv = rm.clone(), rv.clone()
    yt = torch.nn.functional.instance_norm(x, trm, trv, w, b, use_input_stats=True, momentum=0.4, eps=1e-3)
    y = cupybn.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.4, eps=1e-3)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype
    assert_close(y, to_f64(yt), dtype, "vs torch", seed, k=3)
    assert_close(rm, to_f64(trm), pdt, "running_mean vs torch", seed)
    assert_close(rv, to_f64(trv), pdt, "running_var vs torch", seed)


# ============================================================================ layer_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LN_CASES)
@pytest.mark.parametrize("affine", AFFINE)
def test_layer_norm(cupybn, backend, dtype, case, affine, rng, seed):
    require(backend, dtype)
    shape, ns = case
    pdt = param_dtype_for(dtype)
    x64 = make_input(rng, shape, dtype, per_channel=False)
    w = round_to(rng.uniform(0.5, 1.5, ns), pdt) if affine in ("both", "weight") else None
    b = round_to(rng.uniform(-0.5, 0.5, ns), pdt) if affine in ("both", "bias") else None
    y = cupybn.layer_norm(to_backend(x64, backend, dtype), ns, _tb(w, backend, pdt), _tb(b, backend, pdt),
                          eps=1e-5)
    _check_out(y, backend, dtype, shape)
    assert_close(y, oracle.layer_norm(x64, ns, w, b, 1e-5), dtype, "layer_norm", seed)


@pytest.mark.parametrize("ns", [[5], (5,), 5])
def test_layer_norm_normalized_shape_forms(cupybn, ns, rng, seed):
    if isinstance(ns, int) and torch is not None:
        try:
            torch.nn.functional.layer_norm(torch.zeros(2, 5), ns)
        except Exception:
            pytest.skip("torch's functional layer_norm does not take an int either")
    x64 = make_input(rng, (3, 5), "float32", per_channel=False)
    y = cupybn.layer_norm(x64.astype(np.float32), ns)
    assert_close(y, oracle.layer_norm(x64, (5,)), "float32", "layer_norm", seed)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LN_CASES)
def test_layer_norm_vs_torch(cupybn, dtype, case, rng, seed):
    shape, ns = case
    pdt = param_dtype_for(dtype)
    x = to_backend(make_input(rng, shape, dtype, per_channel=False), "torch", dtype)
    w = to_backend(rng.uniform(0.5, 1.5, ns), "torch", pdt)
    b = to_backend(rng.uniform(-0.5, 0.5, ns), "torch", pdt)
    yt = torch.nn.functional.layer_norm(x, ns, w, b, eps=1e-3)
    y = cupybn.layer_norm(x, ns, w, b, eps=1e-3)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype
    assert_close(y, to_f64(yt), dtype, "vs torch", seed, k=3)


# ============================================================================ group_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GN_CASES)
@pytest.mark.parametrize("affine", AFFINE)
def test_group_norm(cupybn, backend, dtype, case, affine, rng, seed):
    require(backend, dtype)
    shape, G = case
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x64 = make_input(rng, shape, dtype)
    w, b = _affine_args(rng, C, pdt, affine)
    y = cupybn.group_norm(to_backend(x64, backend, dtype), G, _tb(w, backend, pdt), _tb(b, backend, pdt), eps=1e-5)
    _check_out(y, backend, dtype, shape)
    assert_close(y, oracle.group_norm(x64, G, w, b, 1e-5), dtype, "group_norm", seed)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GN_CASES)
def test_group_norm_vs_torch(cupybn, dtype, case, rng, seed):
    shape, G = case
    pdt = param_dtype_for(dtype)
    x = to_backend(make_input(rng, shape, dtype), "torch", dtype)
    w, b = (to_backend(a, "torch", pdt) for a in make_affine(rng, shape[1], pdt))
    yt = torch.nn.functional.group_norm(x, G, w, b, eps=1e-3)
    y = cupybn.group_norm(x, G, w, b, eps=1e-3)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype
    assert_close(y, to_f64(yt), dtype, "vs torch", seed, k=3)


# ============================================================================ hard inputs

def _hard_tol(x32_mean, invstd, w=1.0, ulps=3):
    """float32 output: the batch mean itself is a float32, so (x - mean) carries up to ~1 ulp of |mean|;
    allow ``ulps`` ulps of the mean, scaled by invstd, plus float32 rounding of the output."""
    return ulps * np.spacing(np.float32(abs(x32_mean))).astype(np.float64) * invstd * abs(w) + 1e-4


@pytest.mark.parametrize("kind", ["batch", "instance", "layer", "group"])
@pytest.mark.parametrize("std", [1e-2, 1.0])
def test_large_mean_small_std_float32(cupybn, backend, kind, std, rng, seed):
    """float32 inputs with mean 1e4: a correct algorithm (no E[x^2]-E[x]^2) stays accurate.

    With std 1e-2 the float32 x values are quantized to ~1e-3, so the oracle is computed from the
    same float32 values. A naive one-pass variance gives errors of order 1-10 here.
    """
    require(backend)
    shape = (16, 3, 40)
    x32 = (1e4 + std * rng.standard_normal(shape)).astype(np.float32)
    x64 = x32.astype(np.float64)
    xb = to_backend(x32, backend)
    eps = 1e-5 if std == 1.0 else 1e-8
    if kind == "batch":
        rm, rv = np.zeros(3), np.ones(3)
        RM, RV = to_backend(rm, backend, "float32"), to_backend(rv, backend, "float32")
        y = cupybn.batch_norm(xb, RM, RV, training=True, momentum=0.5, eps=eps)
        ye, rme, rve = oracle.batch_norm(x64, rm, rv, None, None, True, 0.5, eps)
        var = x64.var(axis=(0, 2))
        # running stats: mean to a few float32 ulps of 1e4, variance to 1% (naive: garbage)
        np.testing.assert_allclose(to_f64(RM), rme, rtol=0, atol=0.5 * 3 * np.spacing(np.float32(1e4)) + 1e-6,
                                   err_msg=f"running_mean seed={seed}")
        np.testing.assert_allclose(to_f64(RV), rve, rtol=1e-2, err_msg=f"running_var seed={seed}")
    elif kind == "instance":
        y = cupybn.instance_norm(xb, eps=eps)
        ye = oracle.instance_norm(x64, None, None, None, None, True, 0.1, eps)[0]
        var = x64.var(axis=2)
    elif kind == "layer":
        y = cupybn.layer_norm(xb, (3, 40), eps=eps)
        ye = oracle.layer_norm(x64, (3, 40), eps=eps)
        var = x64.var(axis=(1, 2))
    else:
        y = cupybn.group_norm(xb, 3, eps=eps)
        ye = oracle.group_norm(x64, 3, eps=eps)
        var = x64.var(axis=2)
    assert dtype_name(y) == "float32"
    invstd = 1.0 / np.sqrt(var.min() + eps)
    err = np.max(np.abs(to_f64(y) - ye))
    # A float32 mean used as ``x - mean`` would already cost up to ~1 ulp(1e4) * invstd (0.05-0.3 here;
    # torch's CPU kernels are at 0.03-0.16). Subtracting an exact float32 centre first and correcting
    # with the mean of the (exact) deviations keeps float32 accuracy: require 1e-3 as issue 2 asks.
    assert err <= 1e-3, f"{kind}: max error {err} > 1e-3 (loose bound {_hard_tol(1e4, invstd)}) (seed={seed})"
    # normalized output has mean ~0 and std ~1 per normalization group
    assert abs(float(np.mean(to_f64(y)))) < 0.05


@pytest.mark.parametrize("kind", ["batch", "instance", "layer", "group"])
def test_large_mean_float64_is_precise(cupybn, backend, kind, rng, seed):
    require(backend)
    shape = (8, 2, 30)
    x64 = 1e8 + 1e-3 * rng.standard_normal(shape)
    xb = to_backend(x64, backend, "float64")
    if kind == "batch":
        y, ye = cupybn.batch_norm(xb, None, None, training=True), oracle.batch_norm(x64, None, None, training=True)[0]
    elif kind == "instance":
        y, ye = cupybn.instance_norm(xb), oracle.instance_norm(x64)[0]
    elif kind == "layer":
        y, ye = cupybn.layer_norm(xb, (30,)), oracle.layer_norm(x64, (30,))
    else:
        y, ye = cupybn.group_norm(xb, 2), oracle.group_norm(x64, 2)
    # ulp(1e8) = 1.5e-8, std 1e-3: float64 accumulation gives ~1e-5 here; float32 would be garbage
    np.testing.assert_allclose(to_f64(y), ye, atol=1e-4, err_msg=f"seed={seed}")


def test_batch_norm_eps0_constant_channel_gives_zero(cupybn, backend, rng, seed):
    require(backend)
    x64 = make_input(rng, (5, 4, 3), "float32")
    x64[:, 1] = 3.25
    x64[:, 3] = 0.0
    rm, rv = np.zeros(4), np.ones(4)
    RM, RV = to_backend(rm, backend, "float32"), to_backend(rv, backend, "float32")
    y = cupybn.batch_norm(to_backend(x64, backend, "float32"), RM, RV, training=True, momentum=0.1, eps=0.0)
    yn = to_f64(y)
    assert np.all(yn[:, 1] == 0) and np.all(yn[:, 3] == 0), "eps=0, var=0 must give 0, not NaN"
    ye, rme, rve = oracle.batch_norm(x64, rm, rv, None, None, True, 0.1, 0.0)
    assert_close(y, ye, "float32", "eps=0", seed)
    assert_close(RM, rme, "float32", "running_mean", seed)
    assert_close(RV, rve, "float32", "running_var", seed)
    assert to_f64(RV)[1] == np.float32(0.9)
    # with a bias the constant channel gives exactly the bias
    bias = np.array([0.5, -0.75, 1.0, 2.0])
    y = cupybn.batch_norm(to_backend(x64, backend, "float32"), None, None, None,
                          to_backend(bias, backend, "float32"), training=True, eps=0.0)
    assert np.all(to_f64(y)[:, 1] == -0.75) and np.all(to_f64(y)[:, 3] == 2.0)


def test_instance_norm_eps0_constant_instance_gives_zero(cupybn, backend, rng, seed):
    """instance norm normalizes through ATen's batch norm: a constant instance gives 0 with eps=0."""
    require(backend)
    x64 = make_input(rng, (3, 2, 6), "float32")
    x64[1, 0] = 2.5
    y = cupybn.instance_norm(to_backend(x64, backend, "float32"), eps=0.0)
    assert np.all(to_f64(y)[1, 0] == 0)
    assert_close(y, oracle.instance_norm(x64, eps=0.0)[0], "float32", "eps=0", seed)
    if torch is not None:
        yt = torch.instance_norm(torch.tensor(x64, dtype=torch.float32), None, None, None, None, True, 0.1, 0.0, False)
        assert np.all(yt.numpy()[1, 0] == 0)


@needs_torch
def test_eps0_zero_variance_elsewhere_like_torch(cupybn, backend, rng):
    """eps=0: eval with a zero running variance and layer/group norm of a constant row are not finite,
    exactly where torch's result is not finite."""
    require(backend)
    x64 = make_input(rng, (4, 3, 2), "float32")
    x64[:, 2] = 1.0
    x32 = x64.astype(np.float32)
    rm = np.array([0.0, 0.5, 1.0], np.float32)
    rv = np.array([0.0, 1.0, 0.0], np.float32)
    yt = torch.batch_norm(torch.tensor(x32), None, None, torch.tensor(rm), torch.tensor(rv), False, 0.1, 0.0,
                          False).numpy()
    y = to_f64(cupybn.batch_norm(to_backend(x32, backend), to_backend(rm, backend), to_backend(rv, backend),
                                 training=False, eps=0.0))
    np.testing.assert_array_equal(~np.isfinite(y), ~np.isfinite(yt))
    np.testing.assert_allclose(y[:, 1], yt[:, 1], rtol=1e-6)
    xl = np.ones((2, 4), np.float32)
    xl[1] = np.arange(4)
    ylt = torch.nn.functional.layer_norm(torch.tensor(xl), (4,), eps=0.0).numpy()
    yl = to_f64(cupybn.layer_norm(to_backend(xl, backend), (4,), eps=0.0))
    np.testing.assert_array_equal(np.isfinite(yl), np.isfinite(ylt))
    np.testing.assert_allclose(yl[1], ylt[1], rtol=1e-6)
    xg = np.ones((2, 4, 3), np.float32)
    xg[0, 2:] = np.arange(6).reshape(2, 3)
    ygt = torch.nn.functional.group_norm(torch.tensor(xg), 2, eps=0.0).numpy()
    yg = to_f64(cupybn.group_norm(to_backend(xg, backend), 2, eps=0.0))
    np.testing.assert_array_equal(np.isfinite(yg), np.isfinite(ygt))
    np.testing.assert_allclose(yg[0, 2:], ygt[0, 2:], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_propagation_like_torch(cupybn, backend, bad, rng):
    require(backend)
    x32 = make_input(rng, (4, 3, 5), "float32").astype(np.float32)
    x32[2, 1, 3] = bad
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    RM, RV = to_backend(rm, backend), to_backend(rv, backend)
    y = to_f64(cupybn.batch_norm(to_backend(x32, backend), RM, RV, training=True))
    # the bad channel is not finite everywhere, the others are exact
    assert not np.any(np.isfinite(y[:, 1]))
    good = oracle.batch_norm(x32[:, [0, 2]], None, None, training=True)[0]
    assert_close(y[:, [0, 2]], good, "float32", "other channels")
    assert not np.isfinite(to_f64(RM)[1]) and not np.isfinite(to_f64(RV)[1])
    assert np.all(np.isfinite(to_f64(RM)[[0, 2]]))
    yl = to_f64(cupybn.layer_norm(to_backend(x32, backend), (3, 5)))
    assert not np.any(np.isfinite(yl[2])) and np.all(np.isfinite(yl[[0, 1, 3]]))
    yg = to_f64(cupybn.group_norm(to_backend(x32, backend), 3))
    assert not np.any(np.isfinite(yg[2, 1])) and np.isfinite(yg[2, [0, 2]]).all() and np.isfinite(yg[[0, 1, 3]]).all()
    yi = to_f64(cupybn.instance_norm(to_backend(x32, backend)))
    assert not np.any(np.isfinite(yi[2, 1])) and np.isfinite(yi[2, [0, 2]]).all()
    if torch is not None:
        xt = torch.tensor(x32)
        for ours, theirs in [(y, torch.nn.functional.batch_norm(xt, None, None, training=True)),
                             (yl, torch.nn.functional.layer_norm(xt, (3, 5))),
                             (yg, torch.nn.functional.group_norm(xt, 3)),
                             (yi, torch.nn.functional.instance_norm(xt))]:
            np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs.numpy()))
            np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs.numpy()))


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (0, 2, 1, 2, 2)])
def test_empty_batch(cupybn, backend, shape):
    require(backend)
    C = shape[1]
    x = to_backend(np.zeros(shape, np.float32), backend)
    rm, rv = np.arange(C, dtype=np.float32), np.arange(1, C + 1, dtype=np.float32)
    RM, RV = to_backend(rm, backend), to_backend(rv, backend)
    before = snapshot(RM, RV)
    for training in (True, False):
        y = cupybn.batch_norm(x, RM, RV, training=training, momentum=0.5)
        _check_out(y, backend, "float32", shape)
        assert snapshot(RM, RV) == before
    if len(shape) >= 3:
        y = cupybn.instance_norm(x, RM, RV, momentum=0.5)
        _check_out(y, backend, "float32", shape)
        assert snapshot(RM, RV) == before, "empty batch leaves instance-norm running stats unchanged"
    y = cupybn.layer_norm(x, shape[1:])
    _check_out(y, backend, "float32", shape)
    y = cupybn.group_norm(x, 1)
    _check_out(y, backend, "float32", shape)


@pytest.mark.parametrize("shape", [(1, 3, 1, 5), (2, 1, 3), (1, 1, 2), (2, 3, 1, 1, 1), (7, 5, 13), (3, 1, 1, 17)])
def test_size_one_and_odd_dims(cupybn, backend, shape, rng, seed):
    require(backend)
    x64 = make_input(rng, shape, "float32")
    xb = to_backend(x64, backend, "float32")
    C = shape[1]
    rm, rv = make_running(rng, C)
    RM, RV = to_backend(rm, backend, "float32"), to_backend(rv, backend, "float32")
    y = cupybn.batch_norm(xb, RM, RV, training=True, momentum=0.2)
    ye, rme, rve = oracle.batch_norm(x64, rm, rv, None, None, True, 0.2)
    assert_close(y, ye, "float32", "bn", seed)
    assert_close(RM, rme, "float32", "running_mean", seed)
    assert_close(RV, rve, "float32", "running_var", seed)
    if np.prod(shape[2:]) > 1:
        assert_close(cupybn.instance_norm(xb), oracle.instance_norm(x64)[0], "float32", "in", seed)
    assert_close(cupybn.layer_norm(xb, shape[1:]), oracle.layer_norm(x64, shape[1:]), "float32", "ln", seed)
    assert_close(cupybn.layer_norm(xb, shape[-1:]), oracle.layer_norm(x64, shape[-1:]), "float32", "ln1", seed)
    assert_close(cupybn.group_norm(xb, C), oracle.group_norm(x64, C), "float32", "gn", seed)
    assert_close(cupybn.group_norm(xb, 1), oracle.group_norm(x64, 1), "float32", "gn1", seed)


def test_non_contiguous_inputs(cupybn, rng, seed):
    """Strided NumPy / torch views (sliced, transposed, reversed) give the oracle's result."""
    base = make_input(rng, (6, 5, 8), "float32").astype(np.float32)
    views = [lambda a: a[:, :, ::2], lambda a: a.transpose(2, 1, 0) if isinstance(a, np.ndarray) else a.permute(2, 1, 0),
             lambda a: a[:, 1:4]]
    for i, view in enumerate(views):
        v = view(base)
        ye = oracle.batch_norm(v.astype(np.float64), None, None, training=True)[0]
        assert_close(cupybn.batch_norm(v, None, None, training=True), ye, "float32", f"numpy view {i}", seed)
        assert_close(cupybn.layer_norm(v, v.shape[-1:]), oracle.layer_norm(v, v.shape[-1:]), "float32",
                     f"numpy view {i} ln", seed)
        if torch is not None:
            tv = view(torch.from_numpy(base))
            assert not tv.is_contiguous() or i == 2
            assert_close(cupybn.batch_norm(tv, None, None, training=True), ye, "float32", f"torch view {i}", seed)
    rev = base[::-1, ::-1]
    assert_close(cupybn.group_norm(rev, 5), oracle.group_norm(rev, 5), "float32", "reversed", seed)


# ============================================================================ large inputs (blocked / threaded paths)

LARGE = [("batch", (64, 8, 32, 32)), ("batch_flat", (300000, 2)), ("instance", (4, 3, 200, 200)),
         ("layer", (8, 70000)), ("group", (4, 8, 128, 128))]


@pytest.mark.parametrize("kind,shape", LARGE, ids=[k for k, _ in LARGE])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("threads", [False, True], ids=["serial", "threads"])
def test_large_inputs(cupybn, backend, kind, shape, dtype, seed, threads, monkeypatch):
    """Inputs of 0.5-1M elements: several blocks, combined in one thread or across the pool's
    threads; same values as the oracle, bitwise identical on a second call."""
    require(backend, dtype)
    from cupybn import _reference

    monkeypatch.setattr(_reference, "_PARALLEL_MIN_ELEMENTS", 0 if threads else 1 << 62)
    rng = np.random.default_rng(seed)
    x64 = make_input(rng, shape, dtype, offset=3.0, scale=2.0)
    if kind.startswith("batch"):
        # the first samples differ from the rest: a centre taken from the first block is off
        x64[:4] = round_to(x64[:4] + 50.0, dtype)
    x = to_backend(x64, backend, dtype)
    C = shape[1]
    if kind.startswith("batch"):
        rm, rv = np.zeros(C), np.ones(C)
        RM, RV = to_backend(rm, backend, "float32"), to_backend(rv, backend, "float32")
        y = cupybn.batch_norm(x, RM, RV, training=True, momentum=0.5)
        ye, rme, rve = oracle.batch_norm(x64, rm, rv, None, None, True, 0.5)
        assert_close(RM, rme, "float32", "running_mean", seed, k=3)
        assert_close(RV, rve, "float32", "running_var", seed, k=3)
        y2 = cupybn.batch_norm(x, None, None, training=True, momentum=0.5)
    elif kind == "instance":
        y, y2 = cupybn.instance_norm(x), cupybn.instance_norm(x)
        ye = oracle.instance_norm(x64)[0]
    elif kind == "layer":
        y, y2 = cupybn.layer_norm(x, shape[1:]), cupybn.layer_norm(x, shape[1:])
        ye = oracle.layer_norm(x64, shape[1:])
    else:
        y, y2 = cupybn.group_norm(x, 4), cupybn.group_norm(x, 4)
        ye = oracle.group_norm(x64, 4)
    assert_close(y, ye, dtype, kind, seed, k=3)
    np.testing.assert_array_equal(to_f64(y), to_f64(y2), err_msg="not reproducible")


def test_float32_input_with_float64_params_and_stats(cupybn, backend, rng, seed):
    """Wider parameters / running stats than the input: output float32, stats stay float64 (in place)."""
    require(backend)
    shape, C = (6, 3, 5), 3
    x64 = make_input(rng, shape, "float32")
    w, b = make_affine(rng, C, "float64")
    rm, rv = make_running(rng, C, "float64")
    RM, RV = to_backend(rm, backend, "float64"), to_backend(rv, backend, "float64")
    y = cupybn.batch_norm(to_backend(x64, backend, "float32"), RM, RV, to_backend(w, backend, "float64"),
                          to_backend(b, backend, "float64"), training=True, momentum=0.1)
    _check_out(y, backend, "float32", shape)
    ye, rme, rve = oracle.batch_norm(x64, rm, rv, w, b, True, 0.1)
    assert_close(y, ye, "float32", "output", seed)
    assert dtype_name(RM) == "float64" and dtype_name(RV) == "float64"
    # the batch statistics were accumulated in float32: float32 accuracy
    assert_close(RM, rme, "float32", "running_mean", seed)
    assert_close(RV, rve, "float32", "running_var", seed)


def test_torch_parameters_that_require_grad(cupybn, rng):
    """nn.Parameter-like weight/bias (requires_grad) work on the torch CPU path, same values as detached."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((2, 4, 7)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal(4).astype(np.float32)).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(4).astype(np.float32)).requires_grad_()
    calls = [
        lambda w, b: cupybn.batch_norm(x, None, None, w, b, training=True),
        lambda w, b: cupybn.instance_norm(x, weight=w, bias=b),
        lambda w, b: cupybn.group_norm(x, 2, w, b),
    ]
    for call in calls:
        y = call(w, b)
        assert not y.requires_grad
        np.testing.assert_array_equal(y.numpy(), call(w.detach(), b.detach()).numpy())
