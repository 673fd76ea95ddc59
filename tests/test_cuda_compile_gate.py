"""NVRTC compile gate: every kernel instantiation the planner can emit, for sm_75, sm_80, sm_90.

No GPU is needed: NVRTC comes from the pip wheels (``cuda.bindings.nvrtc``; CuPy's own compile
asks for a device first). The program text and options are the CuPy launcher's
(``cupybn._cuda.source``), plus ``-ftz=true`` (which CuPy appends), ``-Xptxas=-v`` and
``-Werror=all-warnings``. A source fails the gate on

* any compiler diagnostic that is a warning (or an error),
* any spill store / spill load or local-memory stack frame reported by ptxas,
* a ``.local`` or ``.ftz`` instruction in the PTX (local memory; flush-to-zero arithmetic that
  would make the GPU differ from the CPU path on subnormals),
* an instantiation that ptxas did not report (it was not compiled at all).

The list compiled is ``planner.INSTANTIATIONS``, the only place the planner takes kernels from.
Run with ``-s`` to see the per-kernel register table.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cupybn._cuda import planner, source

pytestmark = pytest.mark.nvrtc

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="the compile gate needs cuda-bindings (NVRTC)")

ARCHS = ("sm_75", "sm_80", "sm_90")
GATE_OPTIONS = ("-ftz=true", "-Xptxas=-v", "-Werror=all-warnings")
TEST_KERNELS = Path(__file__).resolve().parent / "cuda_kernels"


@dataclass
class KernelReport:
    """ptxas's numbers for one kernel."""

    registers: int = -1
    stack_frame: int = -1
    spill_stores: int = -1
    spill_loads: int = -1


@dataclass
class GateResult:
    """One NVRTC compile of a source with a set of name expressions for one architecture."""

    source: str
    arch: str
    ok: bool
    log: str
    ptx: str = ""
    lowered: dict = field(default_factory=dict)  # name expression -> mangled name
    kernels: dict = field(default_factory=dict)  # mangled name -> KernelReport

    def failures(self) -> list[str]:
        """Everything that fails the gate, one line each (empty: the source passes)."""
        out = []
        if not self.ok:
            out.append(f"{self.source} [{self.arch}] does not compile:\n{self.log}")
            return out
        for line in self.log.splitlines():
            if re.search(r"warning|error", line, re.IGNORECASE):
                out.append(f"{self.source} [{self.arch}] diagnostic: {line.strip()}")
        for expr, mangled in self.lowered.items():
            rep = self.kernels.get(mangled)
            if rep is None:
                out.append(f"{expr} [{self.arch}]: no ptxas report (not compiled?)")
                continue
            if rep.stack_frame or rep.spill_stores or rep.spill_loads:
                out.append(f"{expr} [{self.arch}]: {rep.stack_frame} bytes stack frame, "
                           f"{rep.spill_stores} bytes spill stores, {rep.spill_loads} bytes spill loads")
        for pattern, what in ((r"^\s*\.local\b|\bld\.local|\bst\.local", "local memory"),
                              (r"\.ftz\b", "flush-to-zero arithmetic")):
            hits = [ln.strip() for ln in self.ptx.splitlines() if re.search(pattern, ln)]
            if hits:
                out.append(f"{self.source} [{self.arch}]: {what} in PTX, e.g. {hits[0]!r} ({len(hits)} lines)")
        return out


def _log(prog) -> str:
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00 \n")


def _ptx(prog) -> str:
    err, size = nvrtc.nvrtcGetPTXSize(prog)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetPTX(prog, buf)
    return buf.decode(errors="replace")


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """``{mangled name: KernelReport}`` from ptxas -v output."""
    reports, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = reports.setdefault(m.group(1), KernelReport())
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.stack_frame, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = _REGS.search(line)
        if m:
            current.registers = int(m.group(1))
    return reports


def compile_source(source_name: str, kernels, arch: str, directory: Path | None = None,
                   extra_options=()) -> GateResult:
    """Compile ``source_name`` from ``directory`` (cupybn's kernels by default) with NVRTC."""
    directory = Path(directory) if directory is not None else source.kernel_dir()
    text = source.program_text(source_name, directory).encode()
    # The program must not share the included file's name (NVRTC would see a self-include).
    err, prog = nvrtc.nvrtcCreateProgram(text, f"cupybn_program_{source_name}".encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    try:
        for k in kernels:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, k.encode())
            assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, (k, err)
        options = list(source.nvrtc_options(directory)) + [f"--gpu-architecture={arch}"]
        options += list(GATE_OPTIONS) + list(extra_options)
        encoded = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        result = GateResult(source_name, arch, err == nvrtc.nvrtcResult.NVRTC_SUCCESS, _log(prog))
        if not result.ok:
            return result
        result.ptx = _ptx(prog)
        for k in kernels:
            err, mangled = nvrtc.nvrtcGetLoweredName(prog, k.encode())
            assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, (k, err)
            result.lowered[k] = mangled.decode()
        result.kernels = parse_ptxas(result.log)
        return result
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _table(result: GateResult) -> str:
    rows = [f"  {result.arch}  {rep.registers:3d} regs  {rep.stack_frame} stack  "
            f"{rep.spill_stores}/{rep.spill_loads} spill  {expr}"
            for expr, mangled in result.lowered.items() for rep in [result.kernels.get(mangled, KernelReport())]]
    return "\n".join(rows)


SOURCES = sorted({s for s, _ in planner.INSTANTIATIONS})


# ------------------------------------------------------------------------------------ the gate

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source_name", SOURCES)
def test_every_instantiation_compiles_clean(source_name, arch):
    kernels = planner.instantiations_for(source_name)
    result = compile_source(source_name, kernels, arch)
    print(f"\n{source_name} [{arch}]: {len(kernels)} kernels\n{_table(result)}")
    assert not result.failures(), "\n".join(result.failures())
    assert set(result.lowered) == set(kernels)


def test_the_list_is_what_the_planner_emits():
    """Every dtype combination the planner accepts maps into INSTANTIATIONS, and every entry of
    INSTANTIATIONS is reachable from some plan (no dead kernels compiled for nothing)."""
    emitted = set()
    for x_dtype, p_dtype in itertools.product(planner.FLOAT_DTYPES, repeat=2):
        x = planner.Operand(None, (2, 3, 4), (12, 4, 1), x_dtype)
        y = planner.Operand(None, (2, 3, 4), (12, 4, 1), x_dtype)
        vec = [planner.Operand(None, (3,), (1,), p_dtype) for _ in range(4)]
        for launch in planner.plan_batch_norm_eval_forward(x, y, *vec, eps=1e-5):
            emitted.add((launch.source, launch.kernel))
        # training: x_dtype x running-stat dtype (p_dtype) x affine dtype (p_dtype), and no running
        # statistics / no affine parameters
        acc = planner.Operand(None, (3,), (1,), planner.accumulation_dtype(x_dtype))
        nbt = planner.Operand(None, (), (), "int64")
        for running, affine in ((vec[0], vec[2]), (None, None)):
            plan = planner.plan_batch_norm_train_forward(x, y, acc, acc, running, running, nbt, affine, affine,
                                                         None, 1e-5, save_offset=acc)
            emitted.update((launch.source, launch.kernel) for launch in plan)
        # (N, C) input with many channels: the column statistics kernel
        xc = planner.Operand(None, (4, 64), (64, 1), x_dtype)
        accc = planner.Operand(None, (64,), (1,), planner.accumulation_dtype(x_dtype))
        vecc = planner.Operand(None, (64,), (1,), p_dtype)
        plan = planner.plan_batch_norm_train_forward(xc, xc, accc, accc, vecc, vecc, nbt, None, None, 0.1, 1e-5)
        assert plan[0].notes["columns"]
        emitted.update((launch.source, launch.kernel) for launch in plan)
        # layer / group / instance norm (kernels/fused_groups.cu): fused and split paths
        xg = planner.Operand(None, (2, 4, 9), (36, 9, 1), x_dtype)
        accg = planner.Operand(None, (8,), (1,), planner.accumulation_dtype(x_dtype))
        wg = planner.Operand(None, (4,), (1,), p_dtype)
        for path in ("warp", "block", "split") if x_dtype != "float64" else ("block", "split"):
            plan = planner.plan_groups_forward(xg, xg, planner.instance_norm_layout(xg.shape), wg, wg, 1e-5, True,
                                               save=(accg, accg, accg), path=path)
            emitted.update((launch.source, launch.kernel) for launch in plan)
    # BatchNorm backward (kernels/batch_norm_backward.cu): every (stats, parameter) dtype pair
    for x_dtype in planner.FLOAT_DTYPES:
        x = planner.Operand(None, (2, 3, 4), (12, 4, 1), x_dtype)
        sums = planner.Operand(None, (9,), (1,), planner.accumulation_dtype(x_dtype))
        for s_dtype, p_dtype in planner.backward_stats_params(x_dtype):
            st = planner.Operand(None, (3,), (1,), s_dtype)
            w = planner.Operand(None, (3,), (1,), p_dtype)
            plan = planner.plan_batch_norm_backward(x, x, x, st, st, True, w, w, w, sums, 1e-5)
            assert len(plan) == 2
            emitted.update((launch.source, launch.kernel) for launch in plan)
    # layer / group / instance norm backward (kernels/groups_backward.cu): every (x, weight) dtype pair
    for x_dtype in planner.FLOAT_DTYPES:
        acc = planner.accumulation_dtype(x_dtype)
        x = planner.Operand(None, (2, 3, 4), (12, 4, 1), x_dtype)
        layout = planner.layer_norm_layout(x.shape, (3, 4))
        st = planner.Operand(None, (2,), (1,), acc)
        sums = planner.Operand(None, (4,), (1,), acc)
        ws = planner.Operand(None, (planner.groups_backward_workspace(layout),), (1,), acc)
        for p_dtype in planner.FLOAT_DTYPES:
            w = planner.Operand(None, (12,), (1,), p_dtype)
            plan = planner.plan_groups_backward(x, x, x, layout, st, st, w, w, w, sums, ws)
            assert len(plan) == 4
            emitted.update((launch.source, launch.kernel) for launch in plan)
    assert emitted == set(planner.INSTANTIATIONS)


def test_sources_are_plain_cuda():
    """Kernel files hold device code only and include only the headers the emulator shims."""
    allowed = {"cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h", "cooperative_groups.h", "stdint.h", "cupybn.cuh"}
    for path in sorted(source.kernel_dir().glob("*.cu*")):
        text = path.read_text()
        includes = set(re.findall(r'#\s*include\s*[<"]([^>"]+)[>"]', text))
        assert includes <= allowed, (path.name, includes - allowed)
        assert "<<<" not in text, f"{path.name} launches kernels (host code)"


# ------------------------------------------------------------------------------------ the gate itself is sensitive

def test_gate_catches_local_memory_and_warnings():
    """Deliberately bad kernels (tests/cuda_kernels/gate_violations.cu) fail the gate."""
    spill = compile_source("gate_violations.cu", ["gate_violations::local_array_kernel"], "sm_80", TEST_KERNELS)
    assert any("stack frame" in f or "local memory" in f for f in spill.failures()), spill.failures()
    warn = compile_source("gate_violations.cu", ["gate_violations::unused_variable_kernel"], "sm_80", TEST_KERNELS,
                          extra_options=["-DGATE_VIOLATION_WARNING"])
    assert warn.failures(), "an unused variable must fail the gate"
    ftz = compile_source("gate_violations.cu", ["gate_violations::plain_float_kernel"], "sm_80", TEST_KERNELS)
    assert any("flush-to-zero" in f for f in ftz.failures()), ftz.failures()


def test_device_helpers_compile_clean():
    """The header helpers not used by a product kernel yet (reductions, Welford) compile clean
    for every architecture, through the probe kernels the emulator tests execute."""
    from test_cuda_launcher import HELPER_PROBES

    for arch in ARCHS:
        result = compile_source("helpers_probe.cu", HELPER_PROBES, arch, TEST_KERNELS,
                                extra_options=[f"-I{source.kernel_dir()}"])
        assert not result.failures(), "\n".join(result.failures())
