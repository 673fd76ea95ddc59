"""Values printed in classic BatchNorm / LayerNorm tutorials, and small cases worked out by hand."""
import numpy as np
import pytest

from conftest import require, to_backend, to_f64

TOL = 1e-6


def test_batchnorm1d_eps0_momentum03_trained_on_ones(cupybn, backend):
    """BatchNorm1d(4, eps=0, momentum=0.3) trained on ones four times:
    running_mean 0.3, 0.51, 0.657, 0.7599; running_var 0.7, 0.49, 0.343, 0.2401; then eval output 0.49."""
    require(backend)
    bn = cupybn.BatchNorm1d(4, eps=0, momentum=0.3)
    ones = to_backend(np.ones((8, 4), np.float32), backend)
    expected_mean = [0.3, 0.51, 0.657, 0.7599]
    expected_var = [0.7, 0.49, 0.343, 0.2401]
    for step in range(4):
        y = bn(ones)
        # eps=0 and a zero batch variance: invstd = 0, the output is 0 (not NaN)
        np.testing.assert_array_equal(to_f64(y), np.zeros((8, 4)))
        np.testing.assert_allclose(bn.running_mean, np.full(4, expected_mean[step]), atol=TOL, rtol=0)
        np.testing.assert_allclose(bn.running_var, np.full(4, expected_var[step]), atol=TOL, rtol=0)
        assert int(bn.num_batches_tracked) == step + 1
    bn.eval()
    y = bn(ones)
    np.testing.assert_allclose(to_f64(y), np.full((8, 4), 0.49), atol=TOL, rtol=0)
    assert int(bn.num_batches_tracked) == 4


def test_same_tutorial_with_functional_and_3d_input(cupybn, backend):
    require(backend)
    rm = to_backend(np.zeros(4, np.float32), backend)
    rv = to_backend(np.ones(4, np.float32), backend)
    ones = to_backend(np.ones((2, 4, 3), np.float32), backend)
    for _ in range(4):
        cupybn.batch_norm(ones, rm, rv, training=True, momentum=0.3, eps=0.0)
    np.testing.assert_allclose(to_f64(rm), np.full(4, 0.7599), atol=TOL, rtol=0)
    np.testing.assert_allclose(to_f64(rv), np.full(4, 0.2401), atol=TOL, rtol=0)
    y = cupybn.batch_norm(ones, rm, rv, training=False, eps=0.0)
    np.testing.assert_allclose(to_f64(y), np.full((2, 4, 3), 0.49), atol=TOL, rtol=0)


def test_batchnorm1d_two_by_two(cupybn, backend):
    """[[1, 2], [3, 4]]: per-column mean (2, 3), biased var 1, unbiased var 2."""
    require(backend)
    bn = cupybn.BatchNorm1d(2)
    y = bn(to_backend(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), backend))
    s = 1 / np.sqrt(1 + 1e-5)
    np.testing.assert_allclose(to_f64(y), [[-s, -s], [s, s]], atol=TOL)
    np.testing.assert_allclose(bn.running_mean, [0.2, 0.3], atol=TOL)
    np.testing.assert_allclose(bn.running_var, [1.1, 1.1], atol=TOL)
    bn.eval()
    y = bn(to_backend(np.array([[0.2, 0.3]], np.float32), backend))  # eval accepts one value per channel
    np.testing.assert_allclose(to_f64(y), [[0.0, 0.0]], atol=TOL)


def test_batchnorm2d_arange(cupybn, backend):
    """arange(8) as (2, 1, 2, 2): mean 3.5, biased var 5.25, unbiased 6."""
    require(backend)
    x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    bn = cupybn.BatchNorm2d(1)
    y = bn(to_backend(x, backend))
    np.testing.assert_allclose(to_f64(y), (x - 3.5) / np.sqrt(5.25 + 1e-5), atol=TOL)
    np.testing.assert_allclose(bn.running_mean, [0.35], atol=TOL)
    np.testing.assert_allclose(bn.running_var, [1.5], atol=TOL)


def test_batchnorm_momentum_none_cumulative(cupybn, backend):
    """momentum=None: batches [[0],[2]], [[2],[4]], [[4],[6]] -> running_mean 1, 2, 3; running_var 2, 2, 2."""
    require(backend)
    bn = cupybn.BatchNorm1d(1, momentum=None)
    for k, expected in enumerate([1.0, 2.0, 3.0]):
        bn(to_backend(np.array([[2.0 * k], [2.0 * k + 2]], np.float32), backend))
        np.testing.assert_allclose(bn.running_mean, [expected], atol=TOL)
        np.testing.assert_allclose(bn.running_var, [2.0], atol=TOL)


def test_untrained_batchnorm_eval_is_almost_identity(cupybn, backend):
    require(backend)
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    y = cupybn.BatchNorm1d(3).eval()(to_backend(x, backend))
    np.testing.assert_allclose(to_f64(y), x / np.sqrt(1 + 1e-5), atol=TOL)


def test_layernorm_1234(cupybn, backend):
    """The classic LayerNorm example: [1, 2, 3, 4] -> [-1.3416, -0.4472, 0.4472, 1.3416]."""
    require(backend)
    y = to_f64(cupybn.LayerNorm(4)(to_backend(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32), backend)))
    np.testing.assert_allclose(y, [[-1.3416, -0.4472, 0.4472, 1.3416]], atol=1e-4)
    np.testing.assert_allclose(y, (np.array([[1, 2, 3, 4]]) - 2.5) / np.sqrt(1.25 + 1e-5), atol=TOL)


def test_instancenorm_123(cupybn, backend):
    require(backend)
    y = to_f64(cupybn.InstanceNorm1d(1)(to_backend(np.array([[[1.0, 2.0, 3.0]]], np.float32), backend)))
    np.testing.assert_allclose(y, [[[-1.2247, 0.0, 1.2247]]], atol=1e-4)
    np.testing.assert_allclose(y, (np.array([[[1, 2, 3]]]) - 2) / np.sqrt(2 / 3 + 1e-5), atol=TOL)


def test_groupnorm_arange(cupybn, backend):
    """GroupNorm(2, 4) on arange(8) as (1, 4, 2): groups 0..3 and 4..7, each like LayerNorm([0, 1, 2, 3])."""
    require(backend)
    y = to_f64(cupybn.GroupNorm(2, 4)(to_backend(np.arange(8, dtype=np.float32).reshape(1, 4, 2), backend)))
    row = (np.arange(4) - 1.5) / np.sqrt(1.25 + 1e-5)
    np.testing.assert_allclose(y.reshape(2, 4), np.stack([row, row]), atol=TOL)


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_tutorial_in_other_dtypes(cupybn, dtype):
    bn = cupybn.BatchNorm1d(4, eps=0, momentum=0.3, dtype=dtype)
    for _ in range(4):
        bn(np.ones((8, 4), dtype))
    tol = 2e-3 if dtype == "float16" else 1e-12
    np.testing.assert_allclose(bn.running_mean, 0.7599, atol=tol)
    np.testing.assert_allclose(bn.running_var, 0.2401, atol=tol)
    bn.eval()
    np.testing.assert_allclose(bn(np.ones((2, 4), dtype)), 0.49, atol=tol * 4)
