"""The wheel ships kernels/*.cu as cupybn/kernels, and both install kinds find them at run time; it
ships the py.typed marker and carries the version defined once, as ``cupybn.__version__``."""
import email.parser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILES = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))


def test_source_checkout_finds_top_level_kernels():
    from cupybn._cuda import source

    if Path(source.__file__).resolve().parent.parent.parent != ROOT:
        pytest.skip("cupybn is not imported from this checkout")
    assert source.kernel_dir() == ROOT / "kernels"
    assert KERNEL_FILES, "kernels/ holds no .cu/.cuh file"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (path,) = out.glob("cupybn-*.whl")
    return path


def test_wheel_contains_every_kernel_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"cupybn/kernels/{name}" for name in KERNEL_FILES} <= names
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must live inside the package"


def test_wheel_ships_the_py_typed_marker(wheel):
    assert "cupybn/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_wheel_metadata_version_is_cupybn_version(wheel):
    import cupybn

    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    version = email.parser.HeaderParser().parsestr(archive.read(metadata).decode())["Version"]
    assert version == cupybn.__version__
    assert wheel.name.startswith(f"cupybn-{cupybn.__version__}-")


def test_installed_wheel_finds_its_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    probe = ("import cupybn, cupybn._cuda.source as s; print(cupybn.__file__); print(s.kernel_dir()); "
             "print(len(s.program_text('batch_norm.cu'))); print(cupybn.__version__)")
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True,
                            capture_output=True, text=True)
    module_file, kernel_dir, _, version = result.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert Path(kernel_dir) == site / "cupybn" / "kernels"
    assert sorted(p.name for p in Path(kernel_dir).iterdir()) == KERNEL_FILES
    assert (site / "cupybn" / "py.typed").is_file()
    metadata = next(site.glob("cupybn-*.dist-info")) / "METADATA"
    assert email.parser.HeaderParser().parsestr(metadata.read_text())["Version"] == version
