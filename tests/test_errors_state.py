"""Issue 12, items 5 and 6: a failed call changes no state, and arguments have strict types.

Each failing case asserts the exception type, that the message names the argument, and that every
piece of state (running_mean, running_var, num_batches_tracked, weight, bias) is bitwise
unchanged. The accepted cases check that NumPy scalars, 0-d arrays and ints stay accepted where
torch 2.13 accepts them.
"""
import re

import numpy as np
import pytest

from conftest import snapshot, torch

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


def _names(exc, *names):
    msg = str(exc)
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), \
        f"{type(exc).__name__}: {msg!r} names none of {names}"


def _x(shape=(4, 3, 5), seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) + 1).astype(np.float32)


def _stats(c=3):
    return np.linspace(-1, 1, c).astype(np.float32), np.linspace(0.5, 2, c).astype(np.float32)


def _state(obj):
    """Every piece of state a layer / RunningStats has, bitwise."""
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "mean", "var")
    return snapshot(*(getattr(obj, n, None) for n in names))


def _raises(exc, fn, *names, state=()):
    before = snapshot(*state)
    with pytest.raises(exc) as ei:
        fn()
    assert type(ei.value) is exc, f"{type(ei.value).__name__}: {ei.value}"
    _names(ei.value, *names)
    assert snapshot(*state) == before, "failed call changed state"
    return ei.value


def _used(layer, shape):
    for s in range(2):
        layer(_x(shape, s))
    return layer


def _read_only(a):
    a.flags.writeable = False
    return a


# ================================================================== item 5: read-only running stats

@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_batch_norm_read_only_numpy(cupybn, which):
    rm, rv = _stats()
    _read_only(rm if which == "running_mean" else rv)
    e = _raises(ValueError, lambda: cupybn.batch_norm(_x(), rm, rv, training=True), which,
                state=(rm, rv))
    assert "read-only" in str(e)


def test_batch_norm_read_only_eval_is_fine(cupybn):
    rm, rv = _stats()
    _read_only(rm), _read_only(rv)
    cupybn.batch_norm(_x(), rm, rv, training=False)  # nothing is written in eval


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_instance_norm_read_only_numpy(cupybn, which):
    rm, rv = _stats()
    _read_only(rm if which == "running_mean" else rv)
    _raises(ValueError, lambda: cupybn.instance_norm(_x(), rm, rv), which, state=(rm, rv))


def _torch_bad_var(kind):
    if kind == "inference":
        with torch.inference_mode():
            return torch.linspace(0.5, 2, 3)
    if kind == "requires_grad":
        return torch.linspace(0.5, 2, 3).requires_grad_()
    leaf = torch.linspace(0.5, 2, 3).requires_grad_()
    return leaf[:]  # a view of a leaf that requires grad


@needs_torch
@pytest.mark.parametrize("kind", ["inference", "requires_grad", "view_of_leaf"])
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm", "native_batch_norm",
                                "native_instance_norm", "torch.batch_norm"])
def test_read_only_torch_running_var(cupybn, kind, fn):
    rm = torch.linspace(-1, 1, 3)
    rv = _torch_bad_var(kind)
    x = torch.from_numpy(_x())
    calls = {
        "batch_norm": lambda: cupybn.batch_norm(x, rm, rv, training=True),
        "instance_norm": lambda: cupybn.instance_norm(x, rm, rv),
        "native_batch_norm": lambda: cupybn.native_batch_norm(x, None, None, rm, rv, True),
        "native_instance_norm": lambda: cupybn.native_instance_norm(x, None, None, rm, rv),
    }
    if fn == "torch.batch_norm":
        import cupybn.torch as ct
        calls[fn] = lambda: ct.batch_norm(x, rm, rv, training=True)
    _raises(ValueError, calls[fn], "running_var", state=(rm, rv))


@needs_torch
def test_inference_tensor_inside_inference_mode_is_fine(cupybn):
    with torch.inference_mode():
        rm, rv = torch.zeros(3), torch.ones(3)
        cupybn.batch_norm(torch.from_numpy(_x()), rm, rv, training=True)
    assert float(rm.abs().sum()) > 0


@pytest.mark.parametrize("which", ["running_mean", "running_var", "num_batches_tracked"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_layer_read_only_state(cupybn, which, momentum):
    layer = _used(cupybn.BatchNorm1d(3, momentum=momentum), (4, 3, 5))
    _read_only(getattr(layer, which))
    _raises(ValueError, lambda: layer(_x()), which, state=(layer.weight, layer.bias, layer.running_mean,
                                                          layer.running_var, layer.num_batches_tracked))


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_instancenorm_layer_read_only_state(cupybn, which):
    layer = _used(cupybn.InstanceNorm1d(3, track_running_stats=True), (4, 3, 5))
    _read_only(getattr(layer, which))
    _raises(ValueError, lambda: layer(_x()), which, state=(layer.running_mean, layer.running_var,
                                                          layer.num_batches_tracked))


@pytest.mark.parametrize("which", ["mean", "var", "num_batches_tracked"])
@pytest.mark.parametrize("how", ["update", "observe"])
def test_running_stats_read_only(cupybn, which, how):
    stats = cupybn.RunningStats(3, momentum=None)
    stats.observe(_x())
    _read_only(getattr(stats, which))
    x = _x(seed=1)
    m, v = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    call = (lambda: stats.update(m, v, 20)) if how == "update" else (lambda: stats.observe(x))
    name = {"mean": "running_mean|mean", "var": "running_var|var"}.get(which, which)
    _raises(ValueError, call, *name.split("|"), state=(stats.mean, stats.var, stats.num_batches_tracked))


def test_running_stats_update_bad_shape_changes_nothing(cupybn):
    stats = cupybn.RunningStats(3)
    stats.observe(_x())
    m = np.zeros(3, np.float32)
    v = np.ones((3, 1), np.float32)  # broadcasts in the mean's arithmetic, not in the var's write
    _raises(ValueError, lambda: stats.update(m, v, 20), "batch_var",
            state=(stats.mean, stats.var, stats.num_batches_tracked))


@pytest.mark.parametrize("fn", ["native_batch_norm", "native_instance_norm"])
def test_native_read_only_numpy(cupybn, fn):
    rm, rv = _stats()
    _read_only(rv)
    _raises(ValueError, lambda: getattr(cupybn, fn)(_x(), None, None, rm, rv, True), "running_var",
            state=(rm, rv))


@pytest.mark.parametrize("which", ["running_mean", "running_var", "num_batches_tracked", "bias"])
def test_load_state_dict_into_read_only_changes_nothing(cupybn, which):
    layer = _used(cupybn.BatchNorm1d(3), (4, 3, 5))
    src = {k: np.asarray(v) + 7 for k, v in _used(cupybn.BatchNorm1d(3), (4, 3, 6)).state_dict().items()}
    _read_only(getattr(layer, which))
    _raises(ValueError, lambda: layer.load_state_dict(src), which, state=(
        layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.num_batches_tracked))


@pytest.mark.parametrize("value", [np.array(["1.0", "2.0", "3.0"]), np.array(["a", "b", "c"]),
                                   ["1.0", "2.0", "3.0"], np.array([1 + 1j, 2, 3])])
def test_load_state_dict_non_numeric_values(cupybn, value):
    layer = _used(cupybn.BatchNorm1d(3), (4, 3, 5))
    src = {k: np.asarray(v) + 7 for k, v in layer.state_dict().items()}
    src["running_var"] = value
    _raises(TypeError, lambda: layer.load_state_dict(src), "running_var", state=(
        layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.num_batches_tracked))


@needs_torch
@pytest.mark.parametrize("shape", [(4, 5), (1, 3), (4, 3, 2, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_module_failing_call_increments_nothing(cupybn, shape, momentum):
    import cupybn.torch as ct

    layer = ct.BatchNorm1d(3, momentum=momentum)
    for s in range(2):
        layer(torch.from_numpy(_x((4, 3), s)))
    state = (layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.num_batches_tracked)
    before = snapshot(*state)
    with pytest.raises((ValueError, TypeError)):
        layer(torch.from_numpy(_x(shape)))
    assert snapshot(*state) == before
    layer(torch.from_numpy(_x((4, 3), 5)))  # and a good call after it counts once
    assert int(layer.num_batches_tracked) == 3


@needs_torch
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_module_matches_torch_after_the_fix(cupybn, momentum):
    import cupybn.torch as ct

    ours, ref = ct.BatchNorm1d(3, momentum=momentum), torch.nn.BatchNorm1d(3, momentum=momentum)
    for s in range(3):
        x = torch.from_numpy(_x((4, 3, 5), s))
        torch.testing.assert_close(ours(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name))


# ======================================================================== item 6: strict types

@pytest.mark.parametrize("bad", ["0.1", b"0.1", np.array([0.1]), 1 + 0j, [0.1]], ids=repr)
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm", "native_batch_norm", "native_instance_norm"])
def test_momentum_wrong_type(cupybn, bad, fn):
    rm, rv = _stats()
    calls = {
        "batch_norm": lambda: cupybn.batch_norm(_x(), rm, rv, training=True, momentum=bad),
        "instance_norm": lambda: cupybn.instance_norm(_x(), rm, rv, momentum=bad),
        "native_batch_norm": lambda: cupybn.native_batch_norm(_x(), None, None, rm, rv, True, bad),
        "native_instance_norm": lambda: cupybn.native_instance_norm(_x(), None, None, rm, rv, True, bad),
    }
    _raises(TypeError, calls[fn], "momentum", state=(rm, rv))


@pytest.mark.parametrize("bad", ["1e-5", None, b"1", np.array([1e-5]), [1e-5]], ids=repr)
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm", "layer_norm", "group_norm",
                                "native_batch_norm", "native_layer_norm", "native_group_norm"])
def test_eps_wrong_type(cupybn, bad, fn):
    x = _x((4, 4, 5))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    calls = {
        "batch_norm": lambda: cupybn.batch_norm(x, rm, rv, training=True, eps=bad),
        "instance_norm": lambda: cupybn.instance_norm(x, rm, rv, eps=bad),
        "layer_norm": lambda: cupybn.layer_norm(x, (5,), eps=bad),
        "group_norm": lambda: cupybn.group_norm(x, 2, eps=bad),
        "native_batch_norm": lambda: cupybn.native_batch_norm(x, None, None, rm, rv, True, 0.1, bad),
        "native_layer_norm": lambda: cupybn.native_layer_norm(x, (5,), eps=bad),
        "native_group_norm": lambda: cupybn.native_group_norm(x, 2, eps=bad),
    }
    _raises(TypeError, calls[fn], "eps", state=(rm, rv))


@pytest.mark.parametrize("good", [0.1, 1, np.float32(0.1), np.float64(0.1), np.int64(0), True,
                                  np.array(0.1)], ids=repr)
def test_momentum_and_eps_numeric_types_accepted(cupybn, good):
    x = _x()
    rm, rv = _stats()
    rm2, rv2 = _stats()
    cupybn.batch_norm(x, rm, rv, training=True, momentum=good, eps=good)
    cupybn.batch_norm(x, rm2, rv2, training=True, momentum=float(good), eps=float(good))
    assert snapshot(rm, rv) == snapshot(rm2, rv2)


@needs_torch
def test_momentum_torch_scalar_accepted(cupybn):
    x = torch.from_numpy(_x())
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    cupybn.batch_norm(x, rm, rv, training=True, momentum=torch.tensor(0.25))
    cupybn.batch_norm(x, rm2, rv2, training=True, momentum=0.25)
    assert snapshot(rm, rv) == snapshot(rm2, rv2)


@pytest.mark.parametrize("bad", ["no", "", 1, 0, None, np.array(True)], ids=repr)
def test_batch_norm_training_wrong_type(cupybn, bad):
    rm, rv = _stats()
    _raises(TypeError, lambda: cupybn.batch_norm(_x(), rm, rv, training=bad), "training", state=(rm, rv))
    _raises(TypeError, lambda: cupybn.native_batch_norm(_x(), None, None, rm, rv, bad), "training",
            state=(rm, rv))


@needs_torch
def test_torch_functional_flags_wrong_type(cupybn):
    import cupybn.torch as ct

    x = torch.from_numpy(_x())
    rm, rv = torch.zeros(3), torch.ones(3)
    _raises(TypeError, lambda: ct.batch_norm(x, rm, rv, training="no"), "training", state=(rm, rv))
    _raises(TypeError, lambda: ct.instance_norm(x, rm, rv, use_input_stats="no"), "use_input_stats",
            state=(rm, rv))
    _raises(TypeError, lambda: ct.layer_norm(x, "5"), "normalized_shape")
    _raises(TypeError, lambda: ct.group_norm(x, "3"), "num_groups")
    _raises(TypeError, lambda: ct.batch_norm(x, rm, rv, training=True, momentum="0.1"), "momentum",
            state=(rm, rv))


@pytest.mark.parametrize("bad", ["no", 1, None], ids=repr)
def test_instance_norm_use_input_stats_wrong_type(cupybn, bad):
    rm, rv = _stats()
    _raises(TypeError, lambda: cupybn.instance_norm(_x(), rm, rv, use_input_stats=bad), "use_input_stats",
            state=(rm, rv))
    _raises(TypeError, lambda: cupybn.native_instance_norm(_x(), None, None, rm, rv, bad),
            "use_input_stats", state=(rm, rv))


def test_bool_flags_numpy_bool_accepted(cupybn):
    rm, rv = _stats()
    rm2, rv2 = _stats()
    cupybn.batch_norm(_x(), rm, rv, training=np.bool_(True))
    cupybn.batch_norm(_x(), rm2, rv2, training=True)
    assert snapshot(rm, rv) == snapshot(rm2, rv2)


@pytest.mark.parametrize("bad", ["3", "abc", 3.0, True, ("3",), (3.0,), (True,), None, np.array(3)],
                         ids=repr)
def test_normalized_shape_wrong_type(cupybn, bad):
    _raises(TypeError, lambda: cupybn.LayerNorm(bad), "normalized_shape")
    _raises(TypeError, lambda: cupybn.layer_norm(_x((2, 3)), bad), "normalized_shape")
    _raises(TypeError, lambda: cupybn.native_layer_norm(_x((2, 3)), bad), "normalized_shape")


@pytest.mark.parametrize("bad", [-1, (2, -3)], ids=repr)
def test_normalized_shape_negative(cupybn, bad):
    _raises(ValueError, lambda: cupybn.LayerNorm(bad), "normalized_shape")


@pytest.mark.parametrize("good", [3, np.int64(3), (3,), [3], (np.int64(3),), (np.int32(3),)], ids=repr)
def test_normalized_shape_integer_types_accepted(cupybn, good):
    assert cupybn.LayerNorm(good).normalized_shape == (3,)
    assert cupybn.layer_norm(_x((2, 3)), good).shape == (2, 3)


@pytest.mark.parametrize("cls", ["BatchNorm1d", "InstanceNorm1d"])
@pytest.mark.parametrize("bad", ["3", 3.0, True, None, np.float64(3)], ids=repr)
def test_num_features_wrong_type(cupybn, cls, bad):
    _raises(TypeError, lambda: getattr(cupybn, cls)(bad), "num_features")


def test_running_stats_num_features_wrong_type(cupybn):
    for bad in ("3", 3.0, True):
        _raises(TypeError, lambda: cupybn.RunningStats(bad), "num_features")


@pytest.mark.parametrize("good", [np.int64(3), np.int32(3), np.array(3)], ids=repr)
def test_num_features_integer_types_accepted(cupybn, good):
    assert cupybn.BatchNorm1d(good).num_features == 3
    assert cupybn.RunningStats(good).num_features == 3


@pytest.mark.parametrize("bad", ["2", 2.0, True, None], ids=repr)
def test_num_groups_wrong_type(cupybn, bad):
    x = _x((2, 4, 3))
    _raises(TypeError, lambda: cupybn.GroupNorm(bad, 4), "num_groups")
    _raises(TypeError, lambda: cupybn.group_norm(x, bad), "num_groups")
    _raises(TypeError, lambda: cupybn.native_group_norm(x, bad), "num_groups")


def test_num_channels_wrong_type(cupybn):
    for bad in ("4", 4.0, True):
        _raises(TypeError, lambda: cupybn.GroupNorm(2, bad), "num_channels")


def test_num_groups_integer_types_accepted(cupybn):
    x = _x((2, 4, 3))
    ref = cupybn.group_norm(x, 2)
    assert snapshot(cupybn.group_norm(x, np.int64(2))) == snapshot(ref)
    assert cupybn.GroupNorm(np.int64(2), np.int64(4)).num_groups == 2


@pytest.mark.parametrize("cls,args,flag", [
    ("BatchNorm1d", (3,), "affine"), ("BatchNorm1d", (3,), "track_running_stats"),
    ("InstanceNorm1d", (3,), "affine"), ("InstanceNorm1d", (3,), "track_running_stats"),
    ("LayerNorm", (3,), "elementwise_affine"), ("GroupNorm", (2, 4), "affine"),
    ("BatchNorm1d", (3,), "bias"), ("LayerNorm", (3,), "bias")])
def test_affine_flags_wrong_type(cupybn, cls, args, flag):
    _raises(TypeError, lambda: getattr(cupybn, cls)(*args, **{flag: "no"}), flag)


@pytest.mark.parametrize("cls,args", [("BatchNorm1d", (3,)), ("InstanceNorm1d", (3,)), ("LayerNorm", (3,)),
                                      ("GroupNorm", (2, 4))])
def test_layer_eps_wrong_type(cupybn, cls, args):
    _raises(TypeError, lambda: getattr(cupybn, cls)(*args, eps="1e-5"), "eps")


@pytest.mark.parametrize("cls", ["BatchNorm1d", "InstanceNorm1d"])
def test_layer_momentum_wrong_type(cupybn, cls):
    _raises(TypeError, lambda: getattr(cupybn, cls)(3, momentum="0.1"), "momentum")
    layer = getattr(cupybn, cls)(3, track_running_stats=True)
    _raises(TypeError, lambda: setattr(layer, "momentum", "0.1"), "momentum")
    assert layer.momentum == 0.1
    _raises(TypeError, lambda: cupybn.RunningStats(3, momentum="0.1"), "momentum")


def test_layer_momentum_numpy_scalar_accepted(cupybn):
    a, b = cupybn.BatchNorm1d(3, momentum=np.float32(0.25)), cupybn.BatchNorm1d(3, momentum=0.25)
    for layer in (a, b):
        _used(layer, (4, 3, 5))
    assert snapshot(a.running_mean, a.running_var) == snapshot(b.running_mean, b.running_var)


# ---------------------------------------------------------------- group norm, one value per group

@pytest.mark.parametrize("shape,G", [((1, 4), 4), ((1, 4, 1), 4), ((1, 8, 1, 1), 8)])
def test_group_norm_one_value_per_group(cupybn, shape, G):
    """torch 2.13: ValueError when N * C/G * spatial == 1 (F.group_norm's _verify_batch_size)."""
    x = _x(shape)
    size = [shape[0] * shape[1] // G, G, *shape[2:]]
    msg = f"Expected more than 1 value per channel when training, got input size {size}"
    layer = cupybn.GroupNorm(G, shape[1])
    for call in (lambda: cupybn.group_norm(x, G), lambda: cupybn.native_group_norm(x, G),
                 lambda: layer(x)):
        e = _raises(ValueError, call, "input", state=(layer.weight, layer.bias))
        assert str(e) == msg
    if torch is not None:
        with pytest.raises(ValueError) as ei:
            torch.nn.functional.group_norm(torch.from_numpy(x), G)
        assert str(ei.value) == msg


@pytest.mark.parametrize("shape,G", [((2, 4), 4), ((1, 8), 4), ((0, 4), 4)])
def test_group_norm_more_than_one_value_is_fine(cupybn, shape, G):
    """Where torch 2.13 computes (each group sees more than one value over the batch), so does cupybn."""
    x = _x(shape)
    y = cupybn.group_norm(x, G)
    if torch is not None:
        np.testing.assert_allclose(y, torch.nn.functional.group_norm(torch.from_numpy(x), G).numpy(),
                                   atol=1e-5)
