"""Every error of API.md item 6: TypeError/ValueError naming the argument, state bitwise unchanged.

"Bad input never corrupts state: if a call fails, running_mean, running_var and num_batches_tracked
are exactly what they were before the call (stricter than torch, which increments
num_batches_tracked before it raises)."
"""
import re

import numpy as np
import pytest

from conftest import (
    layer_state_snapshot,
    make_input,
    require,
    snapshot,
    to_backend,
    torch,
)

ERR = (TypeError, ValueError)


def _names(exc, *names):
    msg = str(exc)
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), \
        f"{type(exc).__name__}: {msg!r} names none of {names}"


def _used_layer(cupybn, name, *args, rng=None, **kwargs):
    """A layer that has already seen a few batches, so its state is non-trivial."""
    layer = getattr(cupybn, name)(*args, **kwargs)
    if getattr(layer, "track_running_stats", False):
        rank = {"BatchNorm1d": 3, "BatchNorm2d": 4, "BatchNorm3d": 5, "InstanceNorm1d": 3, "InstanceNorm2d": 4,
                "InstanceNorm3d": 5}[name]
        C = args[0]
        shape = (4, C) + (3,) * (rank - 2)
        r = rng or np.random.default_rng(0)
        for _ in range(2):
            layer(r.standard_normal(shape).astype(np.float32) + 1)
    return layer


def _fails_unchanged(layer, x, exc_types, *names, match=None):
    before = layer_state_snapshot(layer)
    with pytest.raises(exc_types) as ei:
        layer(x)
    if names:
        _names(ei.value, *names)
    if match is not None:
        assert match in str(ei.value), f"{str(ei.value)!r} does not contain {match!r}"
    assert layer_state_snapshot(layer) == before, "failed call changed the running statistics"
    return ei.value


# ============================================================================ layers: wrong rank

RANK_CASES = [
    ("BatchNorm1d", 4, "expected 2D or 3D input (got 4D input)"),
    ("BatchNorm1d", 1, "expected 2D or 3D input (got 1D input)"),
    ("BatchNorm2d", 3, "expected 4D input (got 3D input)"),
    ("BatchNorm2d", 5, "expected 4D input (got 5D input)"),
    ("BatchNorm3d", 4, "expected 5D input (got 4D input)"),
    ("InstanceNorm1d", 4, "expected 2D or 3D input (got 4D input)"),
    ("InstanceNorm2d", 2, "expected 3D or 4D input (got 2D input)"),
    ("InstanceNorm2d", 5, "expected 3D or 4D input (got 5D input)"),
    ("InstanceNorm3d", 3, "expected 4D or 5D input (got 3D input)"),
]


@pytest.mark.parametrize("name,rank,msg", RANK_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_wrong_rank(cupybn, backend, name, rank, msg, training, rng):
    require(backend)
    layer = _used_layer(cupybn, name, 3, track_running_stats=True, rng=rng)
    layer.train(training)
    x = to_backend(rng.standard_normal((4, 3, 3, 3, 3, 3)[:rank]), backend, "float32")
    e = _fails_unchanged(layer, x, ValueError, match=msg)
    assert type(e) is ValueError or isinstance(e, ValueError)


# ============================================================================ layers: one value per channel

@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (1, 3)), ("BatchNorm1d", (1, 3, 1)), ("BatchNorm2d", (1, 3, 1, 1)),
                                        ("BatchNorm3d", (1, 3, 1, 1, 1))])
def test_one_value_per_channel_in_training(cupybn, backend, name, shape, rng):
    require(backend)
    layer = _used_layer(cupybn, name, 3, rng=rng)
    x = to_backend(rng.standard_normal(shape), backend, "float32")
    e = _fails_unchanged(layer, x, ValueError)
    assert str(e).startswith("Expected more than 1 value per channel when training, got input size"), str(e)
    # torch increments num_batches_tracked before raising; cupybn must not (checked above). In eval it works:
    layer.eval()
    y = layer(x)
    assert tuple(y.shape) == shape


def test_one_value_per_channel_functional(cupybn, backend, rng):
    require(backend)
    rm = to_backend(np.array([0.5, 1.0, -1.0]), backend, "float32")
    rv = to_backend(np.array([1.5, 2.0, 0.5]), backend, "float32")
    before = snapshot(rm, rv)
    x = to_backend(rng.standard_normal((1, 3)), backend, "float32")
    with pytest.raises(ValueError) as ei:
        cupybn.batch_norm(x, rm, rv, training=True)
    assert str(ei.value).startswith("Expected more than 1 value per channel when training, got input size")
    assert snapshot(rm, rv) == before
    # no running stats: the same error
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        cupybn.batch_norm(x, None, None, training=True)
    # a layer without tracking uses batch stats in eval too, so it refuses there as well (torch)
    layer = cupybn.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(x)


@pytest.mark.parametrize("name,shape", [("InstanceNorm1d", (2, 3, 1)), ("InstanceNorm2d", (2, 3, 1, 1)),
                                        ("InstanceNorm1d", (3, 1))])
def test_instance_norm_one_spatial_element(cupybn, backend, name, shape, rng):
    require(backend)
    layer = _used_layer(cupybn, name, 3, track_running_stats=True, rng=rng)
    x = to_backend(rng.standard_normal(shape), backend, "float32")
    e = _fails_unchanged(layer, x, ValueError)
    assert str(e).startswith("Expected more than 1"), str(e)
    rm, rv = to_backend(np.zeros(3), backend, "float32"), to_backend(np.ones(3), backend, "float32")
    with pytest.raises(ValueError, match="Expected more than 1"):
        cupybn.instance_norm(to_backend(rng.standard_normal((2, 3, 1)), backend, "float32"), rm, rv)
    assert snapshot(rm, rv) == snapshot(to_backend(np.zeros(3), backend, "float32"),
                                        to_backend(np.ones(3), backend, "float32"))


# ============================================================================ layers: non-floating input

@pytest.mark.parametrize("dtype", ["int64", "int32", "bool", "uint8"])
@pytest.mark.parametrize("name,shape", [("BatchNorm2d", (2, 3, 2, 2)), ("InstanceNorm1d", (2, 3, 4)),
                                        ("LayerNorm", (2, 3, 4)), ("GroupNorm", (2, 3, 4))])
def test_non_floating_input_layers(cupybn, backend, dtype, name, shape, rng):
    require(backend)
    args = {"BatchNorm2d": (3,), "InstanceNorm1d": (3,), "LayerNorm": ((4,),), "GroupNorm": (1, 3)}[name]
    kw = {"track_running_stats": True} if name == "InstanceNorm1d" else {}
    layer = _used_layer(cupybn, name, *args, rng=rng, **kw)
    x = to_backend((rng.integers(0, 5, size=shape)).astype(dtype), backend, dtype)
    _fails_unchanged(layer, x, TypeError, "input")


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_non_floating_input_functional(cupybn, backend, dtype, rng):
    require(backend)
    x = to_backend(rng.integers(0, 3, size=(4, 3, 5)).astype(dtype), backend, dtype)
    rm, rv = to_backend(np.full(3, 0.25), backend, "float32"), to_backend(np.full(3, 2.0), backend, "float32")
    before = snapshot(rm, rv)
    for call in (lambda: cupybn.batch_norm(x, rm, rv, training=True),
                 lambda: cupybn.batch_norm(x, rm, rv, training=False),
                 lambda: cupybn.instance_norm(x, rm, rv),
                 lambda: cupybn.layer_norm(x, (5,)),
                 lambda: cupybn.group_norm(x, 3)):
        with pytest.raises(TypeError) as ei:
            call()
        _names(ei.value, "input")
        assert snapshot(rm, rv) == before


# ============================================================================ channel mismatch

@pytest.mark.parametrize("name,shape,kw", [
    ("BatchNorm1d", (4, 5), {}),
    ("BatchNorm1d", (4, 2, 3), {}),
    ("BatchNorm2d", (2, 4, 3, 3), {}),
    ("BatchNorm3d", (2, 2, 3, 3, 3), {}),
    ("BatchNorm2d", (2, 4, 3, 3), {"affine": False}),
    ("InstanceNorm1d", (2, 4, 5), {"affine": True, "track_running_stats": True}),
    ("InstanceNorm2d", (2, 2, 3, 3), {"affine": True}),
    ("InstanceNorm1d", (2, 4, 5), {"track_running_stats": True}),
])
@pytest.mark.parametrize("training", [True, False])
def test_channel_mismatch(cupybn, backend, name, shape, kw, training, rng):
    require(backend)
    layer = _used_layer(cupybn, name, 3, rng=rng, **kw)
    layer.train(training)
    x = to_backend(rng.standard_normal(shape), backend, "float32")
    _fails_unchanged(layer, x, ERR, "input", "num_features", "running_mean", "weight", "channels")


def test_groupnorm_channel_mismatch(cupybn, backend, rng):
    require(backend)
    layer = cupybn.GroupNorm(2, 4)
    with pytest.raises(ERR) as ei:
        layer(to_backend(rng.standard_normal((2, 6, 3)), backend, "float32"))
    _names(ei.value, "input", "num_channels", "weight", "channels")


@pytest.mark.parametrize("G,C", [(3, 4), (3, 10), (5, 13), (0, 4)])
def test_groupnorm_divisibility(cupybn, G, C):
    with pytest.raises(ValueError) as ei:
        cupybn.GroupNorm(G, C)
    _names(ei.value, "num_groups", "num_channels")


def test_group_norm_functional_divisibility_and_rank(cupybn, backend, rng):
    require(backend)
    with pytest.raises(ValueError) as ei:
        cupybn.group_norm(to_backend(rng.standard_normal((2, 7, 4)), backend, "float32"), 2)
    _names(ei.value, "num_groups")
    with pytest.raises(ValueError) as ei:
        cupybn.group_norm(to_backend(rng.standard_normal((3,)), backend, "float32"), 1)
    _names(ei.value, "input")
    with pytest.raises(ERR) as ei:
        cupybn.group_norm(to_backend(rng.standard_normal((2, 4, 3)), backend, "float32"), 2,
                          to_backend(np.ones(3), backend, "float32"))
    _names(ei.value, "weight")
    with pytest.raises(ERR) as ei:
        cupybn.group_norm(to_backend(rng.standard_normal((2, 4, 3)), backend, "float32"), 2, None,
                          to_backend(np.ones(5), backend, "float32"))
    _names(ei.value, "bias")


def test_layernorm_shape_mismatch(cupybn, backend, rng):
    require(backend)
    layer = cupybn.LayerNorm((3, 4))
    with pytest.raises(ERR) as ei:
        layer(to_backend(rng.standard_normal((2, 4, 3)), backend, "float32"))
    _names(ei.value, "normalized_shape", "input")
    with pytest.raises(ERR) as ei:
        layer(to_backend(rng.standard_normal((4,)), backend, "float32"))
    _names(ei.value, "normalized_shape", "input")
    x = to_backend(rng.standard_normal((2, 3, 4)), backend, "float32")
    with pytest.raises(ERR) as ei:
        cupybn.layer_norm(x, (3, 5))
    _names(ei.value, "normalized_shape", "input")
    with pytest.raises(ERR) as ei:
        cupybn.layer_norm(x, (4,), to_backend(np.ones(3), backend, "float32"))
    _names(ei.value, "weight")
    with pytest.raises(ERR) as ei:
        cupybn.layer_norm(x, (3, 4), None, to_backend(np.ones(4), backend, "float32"))
    _names(ei.value, "bias")


# ============================================================================ functional: mismatched shapes

BN_BAD = [
    ("weight", dict(weight=np.ones(4))),
    ("weight", dict(weight=np.ones((3, 1)))),
    ("bias", dict(bias=np.zeros(2))),
    ("running_mean", dict(running_mean=np.zeros(4))),
    ("running_var", dict(running_var=np.ones(2))),
    ("running_var", dict(running_var=np.ones((3, 1)))),
]


@pytest.mark.parametrize("arg,bad", BN_BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BN_BAD)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
def test_functional_mismatched_shapes(cupybn, backend, arg, bad, training, fn, rng):
    require(backend)
    C = 3
    args = dict(running_mean=np.array([0.25, -0.5, 1.0]), running_var=np.array([1.5, 0.5, 2.0]),
                weight=np.array([1.0, 2.0, 0.5]), bias=np.array([0.0, 0.1, -0.1]))
    args.update(bad)
    arrs = {k: to_backend(v, backend, "float32") for k, v in args.items()}
    before = snapshot(arrs["running_mean"], arrs["running_var"])
    x = to_backend(rng.standard_normal((4, C, 5)), backend, "float32")
    with pytest.raises(ERR) as ei:
        if fn == "batch_norm":
            cupybn.batch_norm(x, arrs["running_mean"], arrs["running_var"], arrs["weight"], arrs["bias"],
                              training=training, momentum=0.5)
        else:
            cupybn.instance_norm(x, arrs["running_mean"], arrs["running_var"], arrs["weight"], arrs["bias"],
                                 use_input_stats=training, momentum=0.5)
    _names(ei.value, arg)
    assert snapshot(arrs["running_mean"], arrs["running_var"]) == before


def test_functional_batch_norm_wrong_rank(cupybn, backend, rng):
    require(backend)
    rm, rv = to_backend(np.zeros(5), backend, "float32"), to_backend(np.ones(5), backend, "float32")
    before = snapshot(rm, rv)
    for x in (to_backend(rng.standard_normal(5), backend, "float32"),
              to_backend(np.array(1.0), backend, "float32")):
        with pytest.raises(ValueError) as ei:
            cupybn.batch_norm(x, rm, rv, training=True)
        _names(ei.value, "input")
        assert snapshot(rm, rv) == before


def test_eval_without_running_stats(cupybn, backend, rng):
    """torch: 'running_mean must be defined in evaluation mode'."""
    require(backend)
    x = to_backend(rng.standard_normal((4, 3)), backend, "float32")
    with pytest.raises(ERR) as ei:
        cupybn.batch_norm(x, None, None, training=False)
    _names(ei.value, "running_mean", "running_var")
    with pytest.raises(ERR) as ei:
        cupybn.instance_norm(to_backend(rng.standard_normal((4, 3, 2)), backend, "float32"), None, None,
                             use_input_stats=False)
    _names(ei.value, "running_mean", "running_var")


def test_only_one_running_stat_given(cupybn, backend, rng):
    require(backend)
    x = to_backend(rng.standard_normal((4, 3)), backend, "float32")
    rm = to_backend(np.array([0.5, 0.25, 1.0]), backend, "float32")
    before = snapshot(rm)
    with pytest.raises(ERR) as ei:
        cupybn.batch_norm(x, rm, None, training=True)
    _names(ei.value, "running_var", "running_mean")
    assert snapshot(rm) == before


# ============================================================================ eps

@pytest.mark.parametrize("training", [True, False])
def test_negative_eps_functional(cupybn, backend, training, rng):
    require(backend)
    x = to_backend(rng.standard_normal((4, 3, 5)), backend, "float32")
    rm, rv = to_backend(np.array([0.1, 0.2, 0.3]), backend, "float32"), to_backend(np.full(3, 2.0), backend, "float32")
    before = snapshot(rm, rv)
    with pytest.raises(ValueError) as ei:
        cupybn.batch_norm(x, rm, rv, training=training, eps=-1e-3)
    _names(ei.value, "eps")
    with pytest.raises(ValueError) as ei:
        cupybn.instance_norm(x, rm, rv, use_input_stats=training, eps=-1e-3)
    _names(ei.value, "eps")
    assert snapshot(rm, rv) == before


@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (4, 3)), ("BatchNorm2d", (2, 3, 2, 2)),
                                        ("InstanceNorm1d", (2, 3, 4))])
def test_negative_eps_layers(cupybn, backend, name, shape, rng):
    """Raised at construction, or at the call with the state untouched."""
    require(backend)
    try:
        layer = getattr(cupybn, name)(3, eps=-1.0, track_running_stats=True)
    except ValueError as e:
        _names(e, "eps")
        return
    x = to_backend(rng.standard_normal(shape), backend, "float32")
    for training in (True, False):
        layer.train(training)
        _fails_unchanged(layer, x, ValueError, "eps")


def test_negative_eps_allowed_for_layer_and_group_norm(cupybn, rng):
    """torch's layer/group norm take any eps; so does cupybn (NaN where var + eps < 0)."""
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    yl = cupybn.LayerNorm(3, eps=-0.5)(x)
    yg = cupybn.GroupNorm(2, 6, eps=-0.5)(x)
    yf = cupybn.layer_norm(x, (3,), eps=-0.5)
    yf2 = cupybn.group_norm(x, 2, eps=-0.5)
    if torch is not None:
        xt = torch.tensor(x)
        for ours, theirs in [(yl, torch.nn.functional.layer_norm(xt, (3,), eps=-0.5)), (yf, None),
                             (yg, torch.nn.functional.group_norm(xt, 2, eps=-0.5)), (yf2, None)]:
            if theirs is not None:
                np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs.numpy()))
                np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)


def test_eps_zero_is_allowed_in_training(cupybn, rng):
    """Recent torch refuses eps <= 0 in training; cupybn follows API.md instead."""
    layer = cupybn.BatchNorm1d(3, eps=0.0)
    y = layer(rng.standard_normal((4, 3)).astype(np.float32))
    assert np.all(np.isfinite(y)) and int(layer.num_batches_tracked) == 1
    cupybn.batch_norm(rng.standard_normal((4, 3)).astype(np.float32), None, None, training=True, eps=0.0)
    cupybn.instance_norm(rng.standard_normal((4, 3, 2)).astype(np.float32), eps=0.0)


# ============================================================================ mixing frameworks / devices

@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_mixing_numpy_and_torch_is_clean(cupybn, rng):
    """Input from one framework and running stats from another (both CPU): either it works and the
    given arrays are updated in place, or a TypeError/ValueError names the argument and nothing changes."""
    x = rng.standard_normal((4, 3)).astype(np.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    try:
        cupybn.batch_norm(x, rm, rv, training=True, momentum=0.5)
    except ERR as e:
        _names(e, "running_mean", "running_var", "input")
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    else:
        np.testing.assert_allclose(rm.numpy(), 0.5 * x.mean(0), rtol=1e-5, atol=1e-7)
    rmn, rvn = np.zeros(3, np.float32), np.ones(3, np.float32)
    try:
        cupybn.batch_norm(torch.tensor(x), rmn, rvn, training=True, momentum=0.5)
    except ERR as e:
        _names(e, "running_mean", "running_var", "input")
        assert np.all(rmn == 0) and np.all(rvn == 1)
    else:
        np.testing.assert_allclose(rmn, 0.5 * x.mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_torch_meta_device_input_is_refused_cleanly(cupybn):
    """A tensor on a device cupybn does not handle (torch 'meta') with CPU state: a clean error, no change."""
    layer = _used_layer(cupybn, "BatchNorm1d", 3)
    before = layer_state_snapshot(layer)
    with pytest.raises(Exception) as ei:
        layer(torch.empty(4, 3, device="meta"))
    assert not isinstance(ei.value, (SystemExit, KeyboardInterrupt)) and str(ei.value)
    assert layer_state_snapshot(layer) == before


# ============================================================================ state after failures

def test_layer_keeps_working_after_errors(cupybn, rng):
    layer = _used_layer(cupybn, "BatchNorm2d", 3, rng=rng)
    snap = layer_state_snapshot(layer)
    bad = [rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((2, 4, 2, 2)).astype(np.float32),
           rng.integers(0, 3, (2, 3, 2, 2)), rng.standard_normal((1, 3, 1, 1)).astype(np.float32)]
    for x in bad:
        with pytest.raises(ERR):
            layer(x)
    assert layer_state_snapshot(layer) == snap
    nbt = int(layer.num_batches_tracked)
    layer(rng.standard_normal((2, 3, 2, 2)).astype(np.float32))
    assert int(layer.num_batches_tracked) == nbt + 1


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_load_state_dict_wrong_shape_raises(cupybn):
    layer = cupybn.BatchNorm1d(3)
    bad = torch.nn.BatchNorm1d(4).state_dict()
    with pytest.raises(Exception):
        layer.load_state_dict(bad)
    assert layer.weight.shape == (3,) and layer.running_mean.shape == (3,)
