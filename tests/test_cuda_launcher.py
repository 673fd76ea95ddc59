"""The launch machinery without a GPU: emulator launcher argument checks, planner unit tests,
the kernel-file locator, the shared device helpers (through probe kernels), and proof that the
emulator checks catch deliberately broken copies of the kernel.
"""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

from cupybn._cuda import planner, source  # noqa: E402
from emulator.launcher import EmulatorLauncher  # noqa: E402
from test_cuda_batch_norm_eval import check_eval_case, get_launcher  # noqa: E402

pytestmark = pytest.mark.emulator

TEST_KERNELS = Path(__file__).resolve().parent / "cuda_kernels"

#: probe kernels of tests/cuda_kernels/helpers_probe.cu (also compiled by the NVRTC gate)
HELPER_PROBES = [
    "probe::block_sum<float>", "probe::block_sum<double>",
    "probe::block_welford<float>", "probe::block_welford<double>",
    "probe::vec_copy<__half>", "probe::vec_copy<__nv_bfloat16>", "probe::vec_copy<float>", "probe::vec_copy<double>",
    "probe::from_float<__half>", "probe::from_float<__nv_bfloat16>", "probe::from_float<float>",
    "probe::from_float<double>",
]


def f32_plan(launcher, shape=(2, 3, 5)):
    """A valid float32 eval plan on emulator buffers, and the buffers."""
    mod = launcher.module("batch_norm.cu")
    x = mod.array(np.ones(shape, np.float32))
    y = mod.zeros(shape, np.float32)
    vec = [mod.array(np.ones(shape[1], np.float32)) for _ in range(4)]
    op = planner.Operand.of
    plan = planner.plan_batch_norm_eval_forward(op(x), op(y), *map(op, vec), eps=1e-5,
                                                device=launcher.device_info())
    return plan, x, y


def with_args(launch, **replace):
    """``launch`` with some arguments replaced (by position)."""
    args = list(launch.args)
    for pos, value in replace.items():
        args[int(pos[1:])] = value
    return planner.KernelLaunch(launch.source, launch.kernel, launch.grid, launch.block, tuple(args),
                                launch.signature)


# ------------------------------------------------------------------------------------ argument checks

class TestEmulatorLauncherArguments:
    def test_valid_plan_runs(self):
        launcher = get_launcher()
        plan, x, y = f32_plan(launcher)
        launcher.launch(plan)
        assert (y == 1.0).all()  # (x - mean) * scale + bias = (1 - 1) * scale + 1

    @pytest.mark.parametrize("pos,value,message", [
        ("a2", 2, "Python int"),                  # rows: i64 -- CuPy would pass 64 bits, but be explicit
        ("a3", np.int32(15), "expected numpy.int64"),
        ("a9", 1e-5, "Python float"),             # eps: f32 -- CuPy would pass a double
        ("a9", np.float64(1e-5), "expected numpy.float32"),
        ("a9", True, "Python bool"),
        ("a0", 3, "scalar"),                      # pointer given a number
        ("a5", np.ones(15, np.float64), "float64"),  # float32* given float64 data
    ])
    def test_rejects_what_cupy_would_marshal_differently(self, pos, value, message):
        launcher = get_launcher()
        plan, _, _ = f32_plan(launcher)
        with pytest.raises(TypeError, match=message):
            launcher.launch([with_args(plan[0], **{pos: value})])

    def test_rejects_wrong_argument_count(self):
        launcher = get_launcher()
        plan, _, _ = f32_plan(launcher)
        launch = plan[0]
        short = planner.KernelLaunch(launch.source, launch.kernel, launch.grid, launch.block, launch.args[:-1],
                                     launch.signature)
        with pytest.raises(TypeError, match="takes 11 arguments"):
            launcher.launch([short])

    def test_rejects_a_planner_signature_that_differs_from_the_kernel(self):
        launcher = get_launcher()
        plan, _, _ = f32_plan(launcher)
        launch = plan[0]
        wrong = launch.signature[:2] + ("i32",) + launch.signature[3:]
        bad = planner.KernelLaunch(launch.source, launch.kernel, launch.grid, launch.block,
                                   launch.args[:2] + (np.int32(2),) + launch.args[3:], wrong)
        with pytest.raises(TypeError, match="planner declares"):
            launcher.launch([bad])

    def test_declared_signatures_match_the_compiled_kernels(self):
        """For every instantiation: the planner's marshalling types are the kernel's parameter types."""
        launcher = get_launcher()
        for src, kernel in planner.INSTANTIATIONS:
            compiled = tuple(launcher.module(src)[kernel].signature)
            assert compiled == planner.declared_signature(src, kernel), kernel

    def test_python_scalars_are_rejected_by_the_shared_check(self):
        with pytest.raises(TypeError, match="CuPy would pass it as a 64-bit integer"):
            planner.check_args("k", ("i32",), (1,))
        with pytest.raises(TypeError, match="as a double"):
            planner.check_args("k", ("f32",), (1.0,))
        planner.check_args("k", ("i32", "f32", "p:bf16"), (np.int32(1), np.float32(1), np.zeros(2, np.int16)))


# ------------------------------------------------------------------------------------ planner

def _op(shape, dtype="float32", strides=None):
    if strides is None:
        strides, acc = [], 1
        for extent in reversed(shape):
            strides.insert(0, acc)
            acc *= extent
    return planner.Operand(None, tuple(shape), tuple(strides), dtype)


class TestPlanner:
    @pytest.mark.parametrize("rows,cols", [(1, 1), (1, 7), (5, 7), (1000000, 3), (3, 10**6), (256, 200704),
                                           (70000, 64), (2, 2**31 + 5), (10**6, 10**3)])
    @pytest.mark.parametrize("dtype", planner.FLOAT_DTYPES)
    def test_tiling_covers_everything_within_limits(self, rows, cols, dtype):
        for dev in (planner.DeviceInfo(), planner.DeviceInfo(sm_count=1)):
            t = planner.normalize_tiling(rows, cols, dtype, dev)
            (gx, gy, gz), (bx, by, bz) = t.grid, t.block
            v = planner.vector_width(dtype)
            assert gz == bz == 1 and t.vector == v
            assert bx * by <= planner.THREADS and by <= rows
            assert gx * bx * v >= cols > (gx - 1) * bx * v  # every column once, no empty block column
            assert 1 <= gy <= dev.max_grid_y and gx <= dev.max_grid_x
            assert gy * by * t.rows_per_thread >= rows
            assert gy <= max(1, dev.sm_count * 8 // gx) or gy == 1

    def test_short_rows_stack_rows_in_a_block(self):
        t = planner.normalize_tiling(100000, 3, "float32")
        assert t.block == (1, 256, 1)
        t = planner.normalize_tiling(100000, 64, "float16")
        assert t.block == (8, 32, 1)

    def test_scalar_argument_types(self):
        for dtype in planner.FLOAT_DTYPES:
            (launch,) = planner.plan_batch_norm_eval_forward(_op((2, 3, 4), dtype), _op((2, 3, 4), dtype),
                                                             *[_op((3,), "float32")] * 4, eps=1e-5)
            assert [type(a) for a in launch.args[2:5]] == [np.int64] * 3
            assert type(launch.args[9]) is (np.float64 if dtype == "float64" else np.float32)
            assert launch.args[2:5] == (2, 12, 4)
            assert launch.smem == 0 and launch.workspace_bytes == 0

    def test_unbatched_channels_and_spatial_one(self):
        (launch,) = planner.plan_batch_norm_eval_forward(_op((8, 5)), _op((8, 5)), *[_op((5,))] * 4, eps=0.0)
        assert launch.args[2:5] == (8, 5, 1)

    def test_rejects_bad_layouts_and_dtypes(self):
        vec = [_op((3,))] * 4
        with pytest.raises(ValueError, match="contiguous"):
            planner.plan_batch_norm_eval_forward(_op((2, 3, 4), strides=(1, 2, 6)), _op((2, 3, 4)), *vec, eps=1e-5)
        with pytest.raises(ValueError, match="does not match"):
            planner.plan_batch_norm_eval_forward(_op((2, 3, 4)), _op((2, 3, 5)), *vec, eps=1e-5)
        with pytest.raises(ValueError, match="shape"):
            planner.plan_batch_norm_eval_forward(_op((2, 3, 4)), _op((2, 3, 4)), *[_op((4,))] * 4, eps=1e-5)
        with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\)"):
            planner.plan_batch_norm_eval_forward(_op((3,)), _op((3,)), *vec, eps=1e-5)
        with pytest.raises(TypeError, match="convert the parameters"):
            planner.plan_batch_norm_eval_forward(_op((2, 3, 4)), _op((2, 3, 4)), _op((3,)), _op((3,)),
                                                 _op((3,), "float16"), None, eps=1e-5)
        with pytest.raises(TypeError, match="running_var"):
            planner.plan_batch_norm_eval_forward(_op((2, 3, 4)), _op((2, 3, 4)), _op((3,)), _op((3,), "float64"),
                                                 None, None, eps=1e-5)

    def test_dimensions_of_extent_one_may_have_any_stride(self):
        assert _op((2, 1, 4), strides=(4, 99, 1)).is_contiguous()
        assert not _op((2, 3, 4), strides=(12, 1, 3)).is_contiguous()

    def test_only_listed_kernels_can_be_planned(self):
        with pytest.raises(AssertionError, match="not in INSTANTIATIONS"):
            planner._instantiation("batch_norm.cu", "cupybn::batch_norm_normalize<float, int, int, 0>")

    def test_operand_of_checks_bf16_storage(self):
        assert planner.Operand.of(np.zeros((2, 3), np.uint16), "bfloat16").dtype == "bfloat16"
        assert planner.Operand.of(np.zeros((2, 3), np.int16), "bfloat16").strides == (3, 1)
        with pytest.raises(TypeError, match="storage dtype"):
            planner.Operand.of(np.zeros(3, np.float32), "bfloat16")
        with pytest.raises(TypeError, match="unsupported dtype"):
            planner.Operand.of(np.zeros(3, np.int32))


# ------------------------------------------------------------------------------------ kernel files

class TestSource:
    def test_kernel_dir_is_the_repository_folder(self):
        assert source.kernel_dir() == Path(__file__).resolve().parent.parent / "kernels"

    def test_program_text_tracks_every_kernel_file(self, tmp_path):
        for f in source.kernel_dir().iterdir():
            shutil.copy(f, tmp_path / f.name)
        before = source.program_text("batch_norm.cu", tmp_path)
        assert '#include "batch_norm.cu"' in before
        (tmp_path / "cupybn.cuh").write_text((tmp_path / "cupybn.cuh").read_text() + "\n// edited\n")
        assert source.program_text("batch_norm.cu", tmp_path) != before  # CuPy's cache key changes

    def test_nvrtc_options(self):
        opts = source.nvrtc_options()
        assert "-std=c++17" in opts and f"-I{source.kernel_dir()}" in opts
        assert any(Path(o[2:], "cuda_fp16.h").is_file() for o in opts if o.startswith("-I"))

    def test_import_without_cupy(self):
        """cupybn._cuda imports (and answers is_gpu_array) when CuPy is not installed."""
        code = ("import sys; sys.modules['cupy'] = None\n"
                "import numpy, cupybn._cuda as c\n"
                "assert not c.is_gpu_array(numpy.zeros(3))\n"
                "try:\n"
                "    c.batch_norm_forward(numpy.zeros((2, 3)), None, None, None, None, True, 0.1, 1e-5)\n"
                "except NotImplementedError as e:\n"
                "    assert 'needs CuPy' in str(e)\n"
                "else:\n"
                "    raise AssertionError('no error without CuPy')\n")
        root = Path(__file__).resolve().parent.parent
        subprocess.run([sys.executable, "-c", code], check=True, cwd=root)

    def test_is_gpu_array_on_cpu_objects(self):
        import cupybn._cuda as c

        torch = pytest.importorskip("torch")
        assert not c.is_gpu_array(torch.zeros(3))
        assert not c.is_gpu_array(np.zeros(3))
        assert not c.is_gpu_array([1.0, 2.0])

        class FakeCuda:
            def __dlpack_device__(self):
                return (2, 0)

        assert c.is_gpu_array(FakeCuda())


# ------------------------------------------------------------------------------------ device helpers

@pytest.fixture(scope="module")
def probes():
    return emulator.build(TEST_KERNELS / "helpers_probe.cu", kernels=HELPER_PROBES,
                          include_dirs=[str(source.kernel_dir())])


class TestDeviceHelpers:
    @pytest.mark.parametrize("acc", ["float", "double"])
    @pytest.mark.parametrize("block", [32, 96, 256, (32, 4), (8, 4, 2)])
    def test_block_sum(self, probes, acc, block):
        dt = np.float32 if acc == "float" else np.float64
        rng = np.random.default_rng(0)
        per_block, blocks = 1000, 3
        x = probes.array(rng.integers(-1000, 1000, per_block * blocks).astype(dt))  # exact sums
        out = probes.zeros(blocks, dt)
        probes[f"probe::block_sum<{acc}>"](blocks, block, x, np.int64(per_block), out, seed=5)
        np.testing.assert_array_equal(out, x.reshape(blocks, -1).sum(axis=1))

    @pytest.mark.parametrize("acc", ["float", "double"])
    def test_block_welford(self, probes, acc):
        dt = np.float32 if acc == "float" else np.float64
        rng = np.random.default_rng(1)
        per_block, blocks = 777, 4
        data = 1e3 + rng.standard_normal(per_block * blocks)
        x = probes.array(data.astype(dt))
        mean, m2 = probes.zeros(blocks, dt), probes.zeros(blocks, dt)
        count = probes.zeros(blocks, np.int64)
        probes[f"probe::block_welford<{acc}>"](blocks, 128, x, np.int64(per_block), mean, m2, count, seed=2)
        ref = x.astype(np.float64).reshape(blocks, -1)
        assert (count == per_block).all()
        tol = 1e-6 if acc == "float" else 1e-13
        np.testing.assert_allclose(mean, ref.mean(axis=1), rtol=tol)
        np.testing.assert_allclose(m2 / per_block, ref.var(axis=1), rtol=200 * tol)

    @pytest.mark.parametrize("dtype,expr", [("float16", "__half"), ("bfloat16", "__nv_bfloat16"),
                                            ("float32", "float"), ("float64", "double")])
    @pytest.mark.parametrize("offset,n", [(0, 64), (1, 64), (3, 13), (0, 7), (5, 1)])
    def test_vec_copy_any_alignment(self, probes, dtype, expr, offset, n):
        storage = planner.storage_dtype(dtype)
        rng = np.random.default_rng(n)
        values = rng.standard_normal(n) * 10.0 ** rng.integers(-8, 5, n)  # finite: NaN payloads do not round-trip
        src = emulator.f32_to_bf16_bits(values) if dtype == "bfloat16" else values.astype(storage)
        xb = probes.empty(n + offset, storage)
        yb = probes.empty(n + offset + 1, storage)  # poisoned: the element past the end must stay untouched
        x, y = xb[offset:], yb[offset:offset + n]
        x[...] = src
        guard = yb[offset + n:].tobytes()
        probes[f"probe::vec_copy<{expr}>"](2, 32, x, y, np.int64(n), seed=3)
        assert y.view(np.uint8).tobytes() == src.view(np.uint8).tobytes()  # bit-exact
        assert yb[offset + n:].tobytes() == guard

    def test_from_float_rounds_like_numpy(self, probes):
        rng = np.random.default_rng(4)
        vals = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-45, 38, 500),
                               [0.0, -0.0, np.inf, -np.inf, 65519.0, 65520.0, 1e-40, -3e-39, 6e-8, 3e-8]])
        vals = vals.astype(np.float32)
        x = probes.array(vals)
        n = np.int64(vals.size)
        blocks = (vals.size + 127) // 128
        for expr, storage, expected in [
            ("__half", np.float16, lambda v: v.astype(np.float16)),
            ("__nv_bfloat16", np.uint16, emulator.f32_to_bf16_bits),
            ("float", np.float32, lambda v: v),
            ("double", np.float64, lambda v: v.astype(np.float64)),
        ]:
            y = probes.zeros(vals.size, storage)
            with np.errstate(over="ignore"):
                probes[f"probe::from_float<{expr}>"](blocks, 128, x, y, n)
                np.testing.assert_array_equal(y, expected(vals), err_msg=expr)


# ------------------------------------------------------------------------------------ broken kernels

# (file, text in the real kernel, replacement, what breaks)
MUTATIONS = {
    "wrong_channel_index": ("batch_norm.cu", "index_t c = col0 / inner;", "index_t c = (col0 + 1) / inner;",
                            "off-by-one channel of the last column of each channel"),
    "tail_store_unchecked": ("cupybn.cuh", "      if (k < n) p[k] = convert<T>(in[k]);",
                             "      p[k] = convert<T>(in[k]);",
                             "a row tail stores past the end of the row (and of y)"),
    "rows_skipped": ("batch_norm.cu", "r < rows; r += row_step)", "r < rows; r += row_step + 1)",
                     "a thread that loops over rows skips some"),
}


def mutated_launcher(tmp_path, name, sm_count=132):
    """An emulator launcher over a copy of kernels/ with one deliberate bug (under tmp_path, never kernels/)."""
    file, old, new, _ = MUTATIONS[name]
    folder = tmp_path / name
    shutil.copytree(source.kernel_dir(), folder)
    text = (folder / file).read_text()
    assert text.count(old) == 1, f"mutation {name!r} no longer applies to {file}; update MUTATIONS"
    (folder / file).write_text(text.replace(old, new))
    return EmulatorLauncher(kernel_dir=folder, device=planner.DeviceInfo(sm_count=sm_count))


@pytest.mark.parametrize("name,shape,x_dtype,sm_count", [
    ("wrong_channel_index", (2, 3, 5, 7), "float32", 132),
    ("tail_store_unchecked", (1024, 3), "float32", 132),  # 12 KiB: y ends on a guard page
    ("rows_skipped", (3000, 3), "float16", 1),
])
def test_broken_kernel_fails_the_same_check(tmp_path, name, shape, x_dtype, sm_count):
    """The check that passes the real kernel (check_eval_case) fails each broken copy of it."""
    check_eval_case(get_launcher(sm_count=sm_count), shape, x_dtype, "float32")  # the real kernel passes
    broken = mutated_launcher(tmp_path, name, sm_count)
    with pytest.raises((AssertionError, emulator.CudaCpuError)) as info:
        check_eval_case(broken, shape, x_dtype, "float32")
    print(f"\n{name} ({MUTATIONS[name][3]}): {type(info.value).__name__}: {str(info.value).splitlines()[0][:200]}")


def test_every_dtype_pair_runs_through_the_launcher():
    """Smoke: each instantiation is reachable from the planner and executes (the full matrix is in
    test_cuda_batch_norm_eval.py)."""
    for x_dtype, p_dtype in itertools.product(planner.FLOAT_DTYPES, repeat=2):
        check_eval_case(get_launcher(), (2, 3, 4), x_dtype, p_dtype)


# ------------------------------------------------------------------------------------ dispatch, emulated

class _FakeCupy:
    """Just enough of CuPy for cupybn._cuda.batch_norm_forward, on emulator memory (NumPy arrays)."""

    ndarray = np.ndarray
    uint16, uint32, float32 = np.uint16, np.uint32, np.float32
    broadcast_to, where = staticmethod(np.broadcast_to), staticmethod(np.where)

    class cuda:  # noqa: N801 - mirrors cupy.cuda
        @staticmethod
        def Device(_index=0):  # noqa: N802
            import contextlib

            return contextlib.nullcontext()

    @staticmethod
    def ascontiguousarray(a):
        return emulator.array(np.ascontiguousarray(a))  # always a copy in emulator memory

    @staticmethod
    def empty(shape, dtype):
        return emulator.empty(shape, dtype)


class _LauncherAdapter:
    def __init__(self, launcher):
        self.launcher = launcher

    def device_info(self):
        return self.launcher.device_info()

    def launch(self, plan):
        self.plans.append(plan)
        self.launcher.launch(plan)

    def prepare(self, plan):
        return self.launcher.prepare(plan)

    def run(self, prepared, buffers):
        self.launch(tuple(p.bound(buffers) for p in prepared))


@pytest.fixture
def emulated_dispatch(monkeypatch):
    """batch_norm_forward with CuPy replaced by emulator memory and the CuPy launcher by the emulator's."""
    import cupybn._cuda as cuda_pkg
    from cupybn._cuda import interop, launchers

    adapter = _LauncherAdapter(get_launcher())
    adapter.plans = []
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy)
    monkeypatch.setattr(interop, "device_id", lambda x: 0)
    monkeypatch.setattr(launchers, "cupy_launcher", lambda: adapter)
    return cuda_pkg.batch_norm_forward, adapter


class TestDispatchOnTheEmulator:
    def test_mixed_parameter_dtypes_are_widened(self, emulated_dispatch):
        from test_cuda_batch_norm_eval import kernel_arithmetic, make_inputs

        forward, adapter = emulated_dispatch
        xs, p = make_inputs((3, 4, 6), "float16", "float16", np.random.default_rng(0))
        x = xs["x"].astype(np.float16)
        y = forward(x, p["mean"].astype(np.float32), p["var"].astype(np.float64), p["weight"].astype(np.float16),
                    None, False, 0.1, 1e-5)
        (launch,) = adapter.plans[0]
        assert launch.kernel == "cupybn::batch_norm_normalize<__half, double, double, cupybn::kRunningVar>"
        assert y.dtype == np.float16 and y.shape == x.shape
        np.testing.assert_array_equal(y.astype(np.float64), kernel_arithmetic(xs["x"], p, 1e-5, "float16",
                                                                               use_bias=False))

    def test_non_contiguous_input_and_empty_batch(self, emulated_dispatch):
        from test_cuda_batch_norm_eval import kernel_arithmetic, make_inputs

        forward, adapter = emulated_dispatch
        xs, p = make_inputs((2, 3, 5, 4), "float32", "float32", np.random.default_rng(1))
        x = xs["x"].astype(np.float32).transpose(0, 1, 3, 2)
        vec = [p[k].astype(np.float32) for k in ("mean", "var", "weight", "bias")]
        y = forward(x, *vec, False, 0.1, 1e-5)
        np.testing.assert_array_equal(y, kernel_arithmetic(xs["x"], p, 1e-5, "float32").transpose(0, 1, 3, 2))
        empty = forward(np.zeros((0, 3, 2), np.float32), *vec, False, 0.1, 1e-5)
        assert empty.shape == (0, 3, 2) and adapter.plans[-1] == ()
