"""cupybn.torch: drop-in torch.nn norm modules with autograd, and convert(model).

* torch.autograd.gradcheck (float64) for every norm, mode (train / eval), running-stat tracking
  and affine setting;
* outputs, gradients and running statistics equal to torch.nn's for float32 / float64 and, with
  a looser tolerance, float16 / bfloat16 (and narrow input through a float32 module);
* state_dict / repr identical to torch's; convert() swaps every norm, nested ones too;
* a small CNN (conv + BatchNorm2d + ReLU + GroupNorm + LayerNorm head) trained 5 SGD steps with
  convert(model) follows the torch original's loss curve and ends with the same parameters.
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import cupybn.torch as ct  # noqa: E402

# (torch class, constructor args, input shape)
PER_CHANNEL = [
    ("BatchNorm1d", (3,), (4, 3)),
    ("BatchNorm1d", (2,), (3, 2, 4)),
    ("BatchNorm2d", (2,), (3, 2, 2, 3)),
    ("BatchNorm3d", (2,), (2, 2, 2, 2, 2)),
    ("InstanceNorm1d", (3,), (2, 3, 4)),
    ("InstanceNorm1d", (3,), (3, 5)),       # unbatched (C, L)
    ("InstanceNorm2d", (2,), (2, 2, 3, 3)),
    ("InstanceNorm3d", (2,), (2, 2, 2, 2, 3)),
]
OTHER = [
    ("LayerNorm", ((3, 4),), {}, (2, 3, 4)),
    ("LayerNorm", (4,), {"elementwise_affine": False}, (2, 3, 4)),
    ("LayerNorm", (4,), {"bias": False}, (2, 3, 4)),
    ("GroupNorm", (2, 4), {}, (2, 4, 3)),
    ("GroupNorm", (2, 4), {"affine": False}, (2, 4, 3)),
    ("GroupNorm", (1, 4), {"bias": False}, (2, 4, 2, 2)),
]


def _pair(name, args, kwargs, dtype=torch.float64, seed=0):
    """(torch module, cupybn module) with identical random parameters and running statistics."""
    torch.manual_seed(seed)
    ref = getattr(nn, name)(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.ndim and "weight" in _name_of(ref, p)
                    else torch.randn_like(p) * 0.5)
        if getattr(ref, "running_mean", None) is not None:
            ref.running_mean.copy_(torch.randn_like(ref.running_mean))
            ref.running_var.copy_(torch.rand_like(ref.running_var) + 0.5)
    mine = getattr(ct, name)(*args, **kwargs).to(dtype)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def _name_of(module, param):
    return next(n for n, p in module.named_parameters() if p is param)


def _configs():
    for (name, args, shape), affine, track, train in itertools.product(
            PER_CHANNEL, [True, False], [True, False], [True, False]):
        yield pytest.param(name, args, {"affine": affine, "track_running_stats": track}, shape,
                           train, id=f"{name}-{len(shape)}d-affine{affine}-track{track}-"
                                     f"{'train' if train else 'eval'}")
    for (name, args, kwargs, shape), train in itertools.product(OTHER, [True, False]):
        yield pytest.param(name, args, kwargs, shape, train,
                           id=f"{name}-{'-'.join(f'{k}{v}' for k, v in kwargs.items()) or 'affine'}-"
                              f"{'train' if train else 'eval'}")


CONFIGS = list(_configs())


# ------------------------------------------------------------------------------------ gradcheck

@pytest.mark.parametrize("name,args,kwargs,shape,train", CONFIGS)
def test_gradcheck(name, args, kwargs, shape, train):
    _, mod = _pair(name, args, kwargs)
    mod.train(train)
    names = [n for n, _ in mod.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in mod.parameters()]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_functional():
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    fns = [lambda x, w, b: ct.batch_norm(x, rm, rv, w, b, True),
           lambda x, w, b: ct.batch_norm(x, rm, rv, w, b, False),
           lambda x, w, b: ct.instance_norm(x, None, None, w, b),
           lambda x, w, b: ct.instance_norm(x, rm, rv, w, b, use_input_stats=False),
           lambda x, w, b: ct.group_norm(x, 2, w, b),
           lambda x, w, b: ct.layer_norm(x.transpose(1, 2), 2, w, b)]
    for f in fns:
        assert torch.autograd.gradcheck(f, (x, w, b))


# ------------------------------------------------------------------- equal to torch.nn's results

TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5),
       torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}


def _close(a, b, dtype, what, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _step(mod, x, dy):
    x = x.clone().requires_grad_(True)
    y = mod(x)
    grads = torch.autograd.grad(y, [x, *mod.parameters()], dy)
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("name,args,kwargs,shape,train", CONFIGS)
def test_matches_torch(name, args, kwargs, shape, train, dtype):
    """Two training-or-eval steps: outputs, all gradients and buffers equal torch.nn's."""
    ref, mine = _pair(name, args, kwargs, dtype)
    ref.train(train)
    mine.train(train)
    if kwargs.get("track_running_stats") and name.startswith("BatchNorm") and train:
        ref.momentum = mine.momentum = None  # cumulative average over num_batches_tracked
    torch.manual_seed(1)
    for _ in range(2):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
        dy = torch.randn(shape, dtype=torch.float64).to(dtype)
        y1, g1 = _step(ref, x, dy)
        y2, g2 = _step(mine, x, dy)
        assert y2.dtype == dtype and all(a.dtype == b.dtype for a, b in zip(g1, g2))
        _close(y2, y1, dtype, "output", 4.0)
        scale = max(1.0, float(g1[0].abs().max()))
        _close(g2[0], g1[0], dtype, "grad_input", scale)
        for a, b in zip(g2[1:], g1[1:]):
            _close(a, b, dtype, "param grad", max(1.0, float(b.abs().max())) * (4 if dtype in (torch.float16, torch.bfloat16) else 1))
        for (n, a), (_, b) in zip(mine.named_buffers(), ref.named_buffers()):
            if a.dtype == torch.int64:
                assert torch.equal(a, b), n
            else:
                _close(a, b, dtype, n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,args,kwargs,shape", [
    ("BatchNorm2d", (2,), {}, (3, 2, 2, 3)),
    ("InstanceNorm1d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 4)),
    ("LayerNorm", ((3, 4),), {}, (2, 3, 4)),
    ("GroupNorm", (2, 4), {}, (2, 4, 3)),
])
def test_narrow_input_float32_module_matches_torch(name, args, kwargs, shape, dtype):
    """Mixed precision: float16 / bfloat16 activations through a float32 module."""
    ref, mine = _pair(name, args, kwargs, torch.float32)
    torch.manual_seed(2)
    x = torch.randn(shape).to(dtype)
    dy = torch.randn(shape).to(dtype)
    y1, g1 = _step(ref, x, dy)
    y2, g2 = _step(mine, x, dy)
    assert y2.dtype == y1.dtype and all(a.dtype == b.dtype for a, b in zip(g1, g2))
    _close(y2, y1, dtype, "output", 4.0)
    _close(g2[0], g1[0], dtype, "grad_input", max(1.0, float(g1[0].abs().max())))
    for a, b in zip(g2[1:], g1[1:]):
        _close(a, b, dtype, "param grad", max(1.0, float(b.abs().max())))


def test_momentum_none_and_instance_norm_rules():
    """Cumulative average over 3 batches; InstanceNorm never counts and reads momentum=None as 0."""
    for name, kw in (("BatchNorm1d", {"momentum": None}),
                     ("InstanceNorm1d", {"momentum": None, "track_running_stats": True}),
                     ("InstanceNorm1d", {"momentum": 0.3, "track_running_stats": True})):
        ref, mine = _pair(name, (3,), kw)
        for i in range(3):
            x = torch.randn(4, 3, 5, dtype=torch.float64)
            ref(x), mine(x)
        for (n, a), (_, b) in zip(mine.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{name} {kw} {n}")
        ref.eval(), mine.eval()
        x = torch.randn(4, 3, 5, dtype=torch.float64)
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- state_dict, repr

@pytest.mark.parametrize("name,args,kwargs,shape,train", [c for c in CONFIGS if c.values[4]])
def test_state_dict_and_repr_are_torchs(name, args, kwargs, shape, train):
    ref = getattr(nn, name)(*args, **kwargs)
    mine = getattr(ct, name)(*args, **kwargs)
    sd1, sd2 = ref.state_dict(), mine.state_dict()
    assert list(sd1) == list(sd2)
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    assert repr(mine) == repr(ref)
    assert isinstance(mine, type(ref))
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in ref.named_parameters()]
    mine.load_state_dict(ref.state_dict())  # strict
    ref.load_state_dict(mine.state_dict())


# -------------------------------------------------------------------------------------- convert

class _MyBatchNorm(nn.BatchNorm1d):
    pass


def test_convert_swaps_every_norm_and_keeps_the_state():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4, momentum=None),
        nn.Sequential(nn.InstanceNorm1d(4, affine=True), nn.GroupNorm(2, 4)),
        nn.ModuleList([nn.LayerNorm(4, bias=False), nn.BatchNorm2d(3, affine=False)]),
        nn.ModuleDict({"a": nn.BatchNorm3d(2, track_running_stats=False),
                       "b": nn.InstanceNorm2d(2, track_running_stats=True),
                       "c": nn.InstanceNorm3d(2)}),
        _MyBatchNorm(4),
    )
    model[1].num_batches_tracked.fill_(7)
    model[1].running_mean.normal_()
    model[3][0].weight.data.normal_()
    model[2][1].eval()
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    converted = ct.convert(model)
    assert converted is model
    kinds = {n: type(m) for n, m in model.named_modules()}
    for n, m in model.named_modules():
        if type(m).__name__ in ct.__all__:
            assert type(m).__module__ == "cupybn.torch", n
    assert kinds["1"] is ct.BatchNorm1d and kinds["2.0"] is ct.InstanceNorm1d
    assert kinds["2.1"] is ct.GroupNorm and kinds["3.0"] is ct.LayerNorm
    assert kinds["3.1"] is ct.BatchNorm2d and kinds["4.a"] is ct.BatchNorm3d
    assert kinds["4.b"] is ct.InstanceNorm2d and kinds["4.c"] is ct.InstanceNorm3d
    assert kinds["5"] is _MyBatchNorm  # subclasses are left alone
    assert kinds["0"] is nn.Conv1d
    for n, p in model.named_parameters():
        assert p is before[n], n  # the same Parameter objects (as convert_sync_batchnorm)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert not model[2][1].training and model[1].training
    assert model[1].momentum is None and model[3][0].bias is None and model[4]["a"].running_mean is None


def test_convert_root_norm_and_outputs():
    ref = nn.BatchNorm2d(3)
    ref.running_var.fill_(2.0)
    mine = ct.convert(copy.deepcopy(ref))
    assert type(mine) is ct.BatchNorm2d
    assert list(mine.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 4, 4)
    ref.eval(), mine.eval()
    torch.testing.assert_close(mine(x), ref(x))


# ------------------------------------------------------------------------------- CNN training

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.LayerNorm(16),
                                  nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        return self.head(torch.nn.functional.avg_pool2d(x, 2))


def _train(model, data, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)], ids=str)
def test_converted_cnn_trains_like_torch(dtype, tol):
    torch.manual_seed(0)
    ref = SmallCNN().to(dtype)
    mine = ct.convert(copy.deepcopy(ref))
    assert type(mine.bn) is ct.BatchNorm2d and type(mine.gn) is ct.GroupNorm
    assert type(mine.head[2]) is ct.LayerNorm
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 8, 8, generator=gen, dtype=dtype) * 2 + 0.5,
             torch.randint(0, 5, (8,), generator=gen)) for _ in range(3)]
    l1, l2 = _train(ref, data), _train(mine, data)
    np.testing.assert_allclose(l2, l1, rtol=tol, atol=tol)
    assert l1[-1] < l1[0]  # it does train
    sd1, sd2 = ref.state_dict(), mine.state_dict()
    assert list(sd1) == list(sd2)
    for k in sd1:
        torch.testing.assert_close(sd2[k], sd1[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")
    ref.eval(), mine.eval()
    torch.testing.assert_close(mine(data[0][0]), ref(data[0][0]), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_cuda_tensors_run_or_name_the_missing_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    mod = ct.BatchNorm2d(3).cuda()
    x = torch.randn(2, 3, 4, 4, device="cuda", requires_grad=True)
    try:
        mod(x).sum().backward()
    except NotImplementedError as exc:
        assert "native_batch_norm" in str(exc) or "backward" in str(exc)


def test_sum_backward_with_expanded_grad_output():
    """loss = y.sum() hands backward a stride-0 (expanded) grad_output."""
    for name, args in (("BatchNorm2d", (3,)), ("GroupNorm", (3, 3)), ("InstanceNorm2d", (3,))):
        ref, mine = _pair(name, args, {})
        x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_(True)
        ref(x1).pow(2).sum().backward()
        mine(x2).pow(2).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
        ref(x1).sum().backward()
        mine(x2).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
        for a, b in zip(mine.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
