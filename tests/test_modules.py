"""Layers: construction, train/eval, reset_*, state_dict round trips with torch, .to(), LayerNorm/GroupNorm."""
import numpy as np
import pytest

import oracle
from conftest import (
    assert_close,
    dtype_name,
    is_backend,
    load_into_torch,
    make_affine,
    make_input,
    require,
    round_to,
    set_layer_params,
    spatial_for,
    to_backend,
    to_f64,
    to_numpy,
    torch,
)

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

# (class name, constructor args, constructor kwargs, input shape)
CONFIGS = [
    ("BatchNorm1d", (4,), {}, (5, 4)),
    ("BatchNorm1d", (4,), {"affine": False}, (5, 4, 3)),
    ("BatchNorm1d", (4,), {"track_running_stats": False}, (5, 4)),
    ("BatchNorm1d", (4,), {"bias": False}, (5, 4, 3)),
    ("BatchNorm2d", (3,), {"momentum": None}, (2, 3, 4, 5)),
    ("BatchNorm2d", (3,), {"eps": 1e-3, "momentum": 0.5}, (2, 3, 4, 5)),
    ("BatchNorm3d", (2,), {}, (2, 2, 3, 2, 2)),
    ("BatchNorm3d", (2,), {"affine": False, "track_running_stats": False}, (2, 2, 3, 2, 2)),
    ("InstanceNorm1d", (3,), {}, (2, 3, 6)),
    ("InstanceNorm1d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 6)),
    ("InstanceNorm1d", (3,), {"affine": True, "bias": False}, (3, 6)),
    ("InstanceNorm2d", (3,), {"track_running_stats": True}, (2, 3, 4, 4)),
    ("InstanceNorm2d", (3,), {"affine": True}, (3, 4, 4)),
    ("InstanceNorm3d", (2,), {"affine": True, "track_running_stats": True}, (2, 2, 3, 2, 2)),
    ("InstanceNorm3d", (2,), {}, (2, 3, 2, 2)),
    ("LayerNorm", (5,), {}, (3, 5)),
    ("LayerNorm", ([3, 5],), {}, (2, 4, 3, 5)),
    ("LayerNorm", ((2, 3),), {"elementwise_affine": False}, (4, 2, 3)),
    ("LayerNorm", ((6,),), {"bias": False}, (6,)),
    ("LayerNorm", ((2, 2, 3),), {"eps": 1e-3}, (2, 2, 2, 2, 3)),
    ("GroupNorm", (2, 6), {}, (3, 6, 4)),
    ("GroupNorm", (3, 6), {"affine": False}, (3, 6, 2, 2)),
    ("GroupNorm", (1, 4), {"bias": False}, (2, 4)),
    ("GroupNorm", (4, 4), {"eps": 1e-3}, (2, 4, 3, 2, 2)),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CONFIGS)]


def _tracks(layer):
    return getattr(layer, "track_running_stats", False)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_construction_defaults(cupybn, cfg):
    name, args, kwargs, _ = cfg
    layer = getattr(cupybn, name)(*args, **kwargs)
    assert layer.training is True
    affine = kwargs.get("affine", kwargs.get("elementwise_affine", not name.startswith("Instance")))
    has_bias = affine and kwargs.get("bias", True)
    if affine:
        assert isinstance(layer.weight, np.ndarray) and layer.weight.dtype == np.float32
        np.testing.assert_array_equal(layer.weight, 1)
    else:
        assert layer.weight is None
    if has_bias:
        assert isinstance(layer.bias, np.ndarray) and layer.bias.dtype == np.float32
        np.testing.assert_array_equal(layer.bias, 0)
    else:
        assert layer.bias is None
    if name.startswith(("Batch", "Instance")):
        track = kwargs.get("track_running_stats", name.startswith("Batch"))
        if track:
            C = args[0]
            assert isinstance(layer.running_mean, np.ndarray) and layer.running_mean.shape == (C,)
            np.testing.assert_array_equal(layer.running_mean, 0)
            np.testing.assert_array_equal(layer.running_var, 1)
            assert layer.running_mean.dtype == np.float32 and layer.running_var.dtype == np.float32
            nbt = layer.num_batches_tracked
            assert isinstance(nbt, np.ndarray) and nbt.shape == () and nbt.dtype == np.int64 and int(nbt) == 0
        else:
            assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None


@needs_torch
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_state_dict_keys_match_torch(cupybn, cfg):
    name, args, kwargs, _ = cfg
    layer = getattr(cupybn, name)(*args, **kwargs)
    tl = getattr(torch.nn, name)(*args, **kwargs)
    sd = layer.state_dict()
    assert list(sd.keys()) == list(tl.state_dict().keys())
    for k, v in sd.items():
        assert isinstance(v, np.ndarray), f"{k}: {type(v)}"
        assert v.shape == tuple(tl.state_dict()[k].shape), k
    if "num_batches_tracked" in sd:
        assert sd["num_batches_tracked"].shape == () and sd["num_batches_tracked"].dtype == np.int64
    if not _tracks(layer):
        assert "running_mean" not in sd and "running_var" not in sd and "num_batches_tracked" not in sd


@needs_torch
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("backend_name", ["numpy", "torch", "strict"])
def test_forward_sequence_matches_torch_nn(cupybn, cfg, backend_name, rng, seed):
    """Random parameters loaded from the torch layer; train x3, eval x2, train: outputs and state agree."""
    require(backend_name)
    name, args, kwargs, shape = cfg
    layer = getattr(cupybn, name)(*args, **kwargs)
    tl = getattr(torch.nn, name)(*args, **kwargs)
    with torch.no_grad():
        for p in (tl.weight, tl.bias):
            if p is not None:
                p.copy_(torch.tensor(rng.uniform(0.5, 1.5, tuple(p.shape))))
    layer.load_state_dict(tl.state_dict())
    for step, training in enumerate([True, True, True, False, False, True]):
        assert layer.train(training) is layer
        tl.train(training)
        x64 = make_input(rng, shape, "float32", per_channel=len(shape) > 1)
        y = layer(to_backend(x64, backend_name, "float32"))
        with torch.no_grad():
            yt = tl(torch.tensor(x64, dtype=torch.float32))
        assert is_backend(y, backend_name) and tuple(y.shape) == shape and dtype_name(y) == "float32"
        assert_close(y, to_f64(yt), "float32", f"{name} step {step}", seed)
        sd, tsd = layer.state_dict(), tl.state_dict()
        assert sd.keys() == tsd.keys()
        for k in sd:
            if k == "num_batches_tracked":
                assert int(sd[k]) == int(tsd[k])
            else:
                assert_close(sd[k], to_f64(tsd[k]), "float32", f"{k} step {step}", seed)


@needs_torch
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_state_dict_round_trip_both_ways(cupybn, cfg, rng):
    name, args, kwargs, shape = cfg
    layer = getattr(cupybn, name)(*args, **kwargs)
    tl = getattr(torch.nn, name)(*args, **kwargs)
    # cupybn -> torch: train cupybn a little so that every entry is non-trivial
    set_layer_params(layer, rng)
    for _ in range(2):
        layer(make_input(rng, shape, "float32").astype(np.float32))
    load_into_torch(tl, layer.state_dict())
    for k, v in tl.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), layer.state_dict()[k], err_msg=k)
    # torch -> cupybn, with different values
    with torch.no_grad():
        tl.train()
        for _ in range(3):
            tl(torch.tensor(make_input(rng, shape, "float32"), dtype=torch.float32))
        for p in (tl.weight, tl.bias):
            if p is not None:
                p.add_(0.25)
    layer2 = getattr(cupybn, name)(*args, **kwargs)
    layer2.load_state_dict(tl.state_dict())
    for k, v in layer2.state_dict().items():
        assert isinstance(v, np.ndarray), k
        np.testing.assert_array_equal(v, tl.state_dict()[k].numpy(), err_msg=k)
        assert v.dtype == tl.state_dict()[k].numpy().dtype, k
    # the loaded values are used
    layer2.eval()
    tl.eval()
    x = make_input(rng, shape, "float32").astype(np.float32)
    with torch.no_grad():
        assert_close(layer2(x), to_f64(tl(torch.tensor(x))), "float32", "after load")


@needs_torch
def test_load_state_dict_copies(cupybn, rng):
    layer = cupybn.BatchNorm1d(3)
    tl = torch.nn.BatchNorm1d(3)
    src = {k: v.clone() for k, v in tl.state_dict().items()}
    layer.load_state_dict(src)
    with torch.no_grad():
        for v in src.values():
            v.add_(5)
    np.testing.assert_array_equal(layer.weight, 1)
    np.testing.assert_array_equal(layer.running_mean, 0)
    assert int(layer.num_batches_tracked) == 0
    # NumPy sources are copied too
    npsrc = {k: np.array(v.numpy(), copy=True) for k, v in tl.state_dict().items()}
    layer.load_state_dict(npsrc)
    for v in npsrc.values():
        v += 7
    np.testing.assert_array_equal(layer.bias, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert int(layer.num_batches_tracked) == 0
    # and the state_dict() it returns does not alias in a way that loading from it later breaks
    sd = layer.state_dict()
    layer2 = cupybn.BatchNorm1d(3)
    layer2.load_state_dict(sd)
    layer2(rng.standard_normal((4, 3)).astype(np.float32))
    np.testing.assert_array_equal(layer.running_mean, 0)


def test_load_state_dict_numpy_values_used(cupybn, rng, seed):
    layer = cupybn.BatchNorm2d(3)
    w, b = make_affine(rng, 3)
    sd = {"weight": w.astype(np.float32), "bias": b.astype(np.float32),
          "running_mean": np.array([0.5, -1.0, 2.0], np.float32), "running_var": np.array([1.5, 0.25, 4.0], np.float32),
          "num_batches_tracked": np.array(7, np.int64)}
    layer.load_state_dict(sd)
    assert int(layer.num_batches_tracked) == 7 and layer.num_batches_tracked.dtype == np.int64
    layer.eval()
    x = make_input(rng, (2, 3, 3, 3), "float32")
    ye = oracle.batch_norm(x, sd["running_mean"], sd["running_var"], w, b, False)[0]
    assert_close(layer(x.astype(np.float32)), ye, "float32", "eval with loaded stats", seed)


@pytest.mark.parametrize("dtype_spec", ["np", "torch", "str"])
@pytest.mark.parametrize("name", ["float64", "float16", "float32"])
def test_dtype_argument_forms(cupybn, dtype_spec, name):
    if dtype_spec == "torch":
        if torch is None:
            pytest.skip("torch not installed")
        dt = getattr(torch, name)
    elif dtype_spec == "np":
        dt = np.dtype(name)
    else:
        dt = name
    for layer in (cupybn.BatchNorm2d(3, dtype=dt), cupybn.InstanceNorm1d(3, affine=True, track_running_stats=True,
                                                                             dtype=dt),
                  cupybn.LayerNorm(4, dtype=dt), cupybn.GroupNorm(1, 3, dtype=dt)):
        for k, v in layer.state_dict().items():
            assert isinstance(v, np.ndarray), k
            if k != "num_batches_tracked":
                assert v.dtype == np.dtype(name), (type(layer).__name__, k, v.dtype)
    if dtype_spec == "np":
        assert cupybn.BatchNorm1d(2, dtype=np.float64).weight.dtype == np.float64


def test_device_cpu_state_is_numpy(cupybn):
    for layer in (cupybn.BatchNorm1d(3, device="cpu"), cupybn.InstanceNorm2d(3, affine=True, track_running_stats=True,
                                                                             device="cpu"),
                  cupybn.LayerNorm((2, 3), device="cpu"), cupybn.GroupNorm(1, 3, device="cpu")):
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            v = getattr(layer, attr, None)
            assert v is None or type(v) is np.ndarray, (type(layer).__name__, attr, type(v))
        for k, v in layer.state_dict().items():
            assert type(v) is np.ndarray


def test_to_cpu_returns_layer_and_keeps_state(cupybn, rng):
    layer = cupybn.BatchNorm1d(3)
    layer(rng.standard_normal((4, 3)).astype(np.float32))
    before = {k: np.array(v) for k, v in layer.state_dict().items()}
    assert layer.to("cpu") is layer
    for k, v in layer.state_dict().items():
        assert type(v) is np.ndarray
        np.testing.assert_array_equal(v, before[k])
    layer(rng.standard_normal((4, 3)).astype(np.float32))
    assert int(layer.num_batches_tracked) == 2


def _cuda_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_to_cuda_raises_cleanly_without_gpu(cupybn, rng):
    if _cuda_available():
        pytest.skip("a GPU is present: covered by the GPU tests")
    layer = cupybn.BatchNorm1d(3)
    layer(rng.standard_normal((4, 3)).astype(np.float32))
    before = {k: np.array(v) for k, v in layer.state_dict().items()}
    with pytest.raises(Exception) as ei:
        layer.to("cuda")
    assert not isinstance(ei.value, (SystemExit, KeyboardInterrupt))
    assert str(ei.value), "the error should say why"
    # the layer is still a working CPU layer with the same state
    for k, v in layer.state_dict().items():
        assert type(v) is np.ndarray
        np.testing.assert_array_equal(v, before[k])
    layer(rng.standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(Exception):
        cupybn.BatchNorm1d(3, device="cuda")


@pytest.mark.parametrize("name,args,shape", [("BatchNorm2d", (3,), (2, 3, 2, 2)),
                                             ("InstanceNorm1d", (3,), (2, 3, 5)),
                                             ("LayerNorm", ((4,),), (3, 4)), ("GroupNorm", (1, 3), (2, 3, 2))])
def test_reset_parameters_and_running_stats(cupybn, name, args, shape, rng):
    kw = {"affine": True, "track_running_stats": True} if name == "InstanceNorm1d" else {}
    layer = getattr(cupybn, name)(*args, **kw)
    set_layer_params(layer, rng)
    x = make_input(rng, shape, "float32").astype(np.float32)
    layer(x)
    layer(x)
    assert not np.all(layer.weight == 1)
    w_obj = layer.weight
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.weight, 1)
    np.testing.assert_array_equal(layer.bias, 0)
    assert layer.weight.dtype == np.float32 and w_obj.shape == layer.weight.shape
    if hasattr(layer, "reset_running_stats"):
        if name.startswith("Batch"):
            layer(x)
            assert int(layer.num_batches_tracked) == 1
            assert not np.all(layer.running_mean == 0)
        layer(x)
        layer.reset_running_stats()
        np.testing.assert_array_equal(layer.running_mean, 0)
        np.testing.assert_array_equal(layer.running_var, 1)
        assert int(layer.num_batches_tracked) == 0 and layer.num_batches_tracked.dtype == np.int64
        # reset_parameters resets the running stats too (torch)
        layer(x)
        layer.reset_parameters()
        np.testing.assert_array_equal(layer.running_mean, 0)
        assert int(layer.num_batches_tracked) == 0


def test_train_eval_return_layer_and_flags(cupybn):
    layer = cupybn.BatchNorm1d(2)
    assert layer.training is True
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False
    assert layer.train(mode=True) is layer and layer.training is True


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "strict"])
def test_layer_output_follows_input_backend_state_stays_numpy(cupybn, backend_name, rng):
    require(backend_name)
    layer = cupybn.BatchNorm2d(3)
    y = layer(to_backend(make_input(rng, (2, 3, 2, 2), "float32"), backend_name, "float32"))
    assert is_backend(y, backend_name)
    assert type(layer.running_mean) is np.ndarray and type(layer.weight) is np.ndarray
    assert int(layer.num_batches_tracked) == 1


def test_in_place_parameter_edits_are_used(cupybn, rng, seed):
    """The parameters are live NumPy arrays: writing into them changes the result (as a torch user
    doing ``with torch.no_grad(): layer.weight.fill_(2)`` expects)."""
    layer = cupybn.BatchNorm1d(3)
    layer.weight[...] = 2.0
    layer.bias[...] = np.array([0.0, 1.0, -1.0], np.float32)
    x = make_input(rng, (5, 3), "float32")
    ye = oracle.batch_norm(x, None, None, np.full(3, 2.0), [0.0, 1.0, -1.0], True)[0]
    assert_close(layer(x.astype(np.float32)), ye, "float32", "edited params", seed)


# ---------------------------------------------------------------------------- LayerNorm / GroupNorm

@pytest.mark.parametrize("ns,shape", [(4, (4,)), (4, (2, 4)), ((3, 4), (2, 3, 4)), ([4], (2, 2, 2, 4)),
                                      ((2, 3, 4), (2, 3, 4)), ((1,), (3, 1)), ((5,), (1, 1, 1, 1, 5))])
@pytest.mark.parametrize("affine", ["both", "no_bias", "none"])
def test_layernorm_any_rank(cupybn, backend, ns, shape, affine, rng, seed):
    require(backend)
    kw = {"elementwise_affine": affine != "none", "bias": affine == "both"}
    layer = cupybn.LayerNorm(ns, eps=1e-4, **kw)
    sd = set_layer_params(layer, rng)
    nst = (ns,) if isinstance(ns, int) else tuple(ns)
    assert layer.state_dict().keys() == ({"weight", "bias"} if affine == "both" else
                                         {"weight"} if affine == "no_bias" else set())
    if affine != "none":
        assert layer.weight.shape == nst
    x = make_input(rng, shape, "float32", per_channel=False)
    for training in (True, False):  # LayerNorm has no train/eval difference
        layer.train(training)
        y = layer(to_backend(x, backend, "float32"))
        assert is_backend(y, backend)
        assert_close(y, oracle.layer_norm(x, nst, sd.get("weight"), sd.get("bias"), 1e-4), "float32", "ln", seed)
    if torch is not None:
        tl = torch.nn.LayerNorm(ns, eps=1e-4, **kw)
        load_into_torch(tl, layer.state_dict())
        with torch.no_grad():
            assert_close(layer(x.astype(np.float32)), to_f64(tl(torch.tensor(x, dtype=torch.float32))),
                         "float32", "vs torch", seed)


@pytest.mark.parametrize("G,C,shape", [(2, 6, (3, 6, 4)), (3, 6, (2, 6)), (1, 4, (2, 4, 3, 3)), (4, 4, (1, 4, 2)),
                                       (2, 4, (2, 4, 2, 2, 3))])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_groupnorm(cupybn, backend, G, C, shape, affine, dtype, rng, seed):
    require(backend, dtype)
    layer = cupybn.GroupNorm(G, C, affine=affine)
    sd = set_layer_params(layer, rng)
    x = make_input(rng, shape, dtype)
    y = layer(to_backend(x, backend, dtype))
    assert is_backend(y, backend) and dtype_name(y) == dtype
    assert_close(y, oracle.group_norm(x, G, sd.get("weight"), sd.get("bias")), dtype, "gn", seed)


def test_unbatched_instance_norm_matches_batched(cupybn, backend, rng, seed):
    require(backend)
    for name, shape in [("InstanceNorm1d", (3, 7)), ("InstanceNorm2d", (3, 4, 5)), ("InstanceNorm3d", (3, 2, 3, 2))]:
        layer = getattr(cupybn, name)(3, affine=True, track_running_stats=True, momentum=0.5)
        sd = set_layer_params(layer, rng)
        x = make_input(rng, shape, "float32", per_channel=False)
        y = layer(to_backend(x, backend, "float32"))
        assert tuple(y.shape) == shape
        ye, rm, rv = oracle.instance_norm(x[None], np.zeros(3), np.ones(3), sd["weight"], sd["bias"], True, 0.5)
        assert_close(y, ye[0], "float32", name, seed)
        assert_close(layer.running_mean, rm, "float32", name, seed)
        assert_close(layer.running_var, rv, "float32", name, seed)
        layer.eval()
        y = layer(to_backend(x, backend, "float32"))
        ye = oracle.instance_norm(x[None], rm, rv, sd["weight"], sd["bias"], False)[0]
        assert_close(y, ye[0], "float32", name + " eval", seed)


def test_layer_repr_and_attributes(cupybn):
    layer = cupybn.BatchNorm2d(3, eps=1e-3, momentum=0.2)
    assert layer.num_features == 3 and layer.eps == 1e-3 and layer.momentum == 0.2
    assert layer.affine is True and layer.track_running_stats is True
    ln = cupybn.LayerNorm(4)
    assert tuple(ln.normalized_shape) == (4,) and ln.elementwise_affine is True
    gn = cupybn.GroupNorm(2, 4)
    assert gn.num_groups == 2 and gn.num_channels == 4
    assert isinstance(repr(layer), str) and "3" in repr(layer)


def test_momentum_and_eps_attributes_are_read_at_forward(cupybn, rng, seed):
    """As in torch, changing layer.momentum / layer.eps after construction takes effect."""
    layer = cupybn.BatchNorm1d(3)
    layer.momentum = 0.5
    layer.eps = 0.25
    x = make_input(rng, (6, 3), "float32")
    y = layer(x.astype(np.float32))
    ye, rm, rv = oracle.batch_norm(x, np.zeros(3), np.ones(3), None, None, True, 0.5, 0.25)
    assert_close(y, ye, "float32", "eps changed", seed)
    assert_close(layer.running_mean, rm, "float32", "momentum changed", seed)
    layer.momentum = None  # cumulative average from now on: factor 1 / num_batches_tracked = 1/2
    x2 = make_input(rng, (6, 3), "float32")
    layer(x2.astype(np.float32))
    assert_close(layer.running_mean, 0.5 * rm + 0.5 * x2.mean(0), "float32", "momentum None", seed)
