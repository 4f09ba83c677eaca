"""The build decisions (setup.py's CUDA switch and GPU architectures, the Makefile's GPU detection) and the
conftest rule that a CUDA test may not skip on a machine with a GPU; all checked without building anything."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffpure_fast import _build

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("user, gpu_visible, expected", [
    (None, False, "8.0;9.0+PTX"),  # no GPU to detect: the project's targets, with PTX for newer GPUs
    ("", False, "8.0;9.0+PTX"),
    ("  ", False, "8.0;9.0+PTX"),
    (None, True, None),  # torch detects the visible GPU (a T4 gets sm_75, a Blackwell sm_100/120)
    ("", True, None),
    ("7.5", False, "7.5"),  # the user's choice always wins
    ("7.5;12.0+PTX", True, "7.5;12.0+PTX"),
])
def test_cuda_arch_list(user, gpu_visible, expected):
    assert _build.cuda_arch_list(user, gpu_visible=gpu_visible) == expected


def test_default_arch_list_embeds_ptx_for_the_newest_arch():
    archs = _build.DEFAULT_ARCH_LIST.split(";")
    assert archs[-1].endswith("+PTX") and sum(a.endswith("+PTX") for a in archs) == 1
    numbers = [float(a.removesuffix("+PTX")) for a in archs]
    assert numbers == sorted(numbers) and {8.0, 9.0} <= set(numbers)


# Excerpts of torch.utils.cpp_extension: 2.11 builds extensions as C++17 (its docstring's example says c++20), 2.13
# as C++20.
_TORCH_2_11 = """
        ...                 extra_compile_args={'cxx': ['-g', '-std=c++20', '-fPIC']})
            cpp_flag = cpp_flag_prefix + 'c++17'
                cuda_cflags = ['-std=c++17']
    common_cflags += ['-std=c++17', '-fPIC']
"""
_TORCH_2_13 = _TORCH_2_11.replace("c++17", "c++20")


@pytest.mark.parametrize("source, expected", [
    (_TORCH_2_11, "c++17"),
    (_TORCH_2_13, "c++20"),
    (_TORCH_2_11.replace("cpp_flag = cpp_flag_prefix + 'c++17'", ""), "c++17"),  # the most frequent flag
])
def test_cxx_standard_of_torchs_extension_builder(source, expected):
    assert _build.cxx_standard(source) == expected


def test_cxx_standard_of_the_installed_torch():
    import inspect

    import torch.utils.cpp_extension as ext

    std = _build.cxx_standard(inspect.getsource(ext))
    assert std in ("c++17", "c++20")
    with pytest.raises(ValueError, match="cpp_extension_source"):
        _build.cxx_standard("no flags here")
    assert '"-std=$CXX_STD"' in (ROOT / "scripts" / "check_cuda_compile.sh").read_text()


def test_setup_py_leaves_arch_detection_to_torch():
    """No hard-coded -gencode in setup.py: it would stop torch's detection of the visible GPU and embed no PTX."""
    text = (ROOT / "setup.py").read_text()
    assert '"-gencode' not in text and "_build.cuda_arch_list(" in text and "_build.use_cuda(" in text


@pytest.mark.parametrize("env, gpu_visible, expected", [
    ({}, False, False),
    ({}, True, True),
    ({"FORCE_CUDA": "1"}, False, True),
    ({"FORCE_CUDA": "yes"}, False, True),
    ({"FORCE_CUDA": "0"}, False, False),
    ({"DIFFPURE_FAST_NO_CUDA": "1"}, True, False),
    ({"DIFFPURE_FAST_NO_CUDA": "ON", "FORCE_CUDA": "1"}, True, False),
])
def test_use_cuda(env, gpu_visible, expected):
    assert _build.use_cuda(env, gpu_visible=gpu_visible, torch_cuda="12.8", cuda_home="/usr/local/cuda") is expected


def test_use_cuda_explains_a_build_that_cannot_succeed():
    with pytest.raises(RuntimeError, match="CPU-only build"):
        _build.use_cuda({"FORCE_CUDA": "1"}, gpu_visible=False, torch_cuda=None, cuda_home="/usr/local/cuda")
    with pytest.raises(RuntimeError, match="CUDA toolkit"):
        _build.use_cuda({}, gpu_visible=True, torch_cuda="12.8", cuda_home=None)
    # Not requested: no error, whatever the machine lacks.
    assert not _build.use_cuda({}, gpu_visible=False, torch_cuda=None, cuda_home=None)


def _fake_nvidia_smi(directory: Path, script: str) -> Path:
    directory.mkdir()
    tool = directory / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + script + "\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return directory


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("smi, force", [
    ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"', True),  # a GPU: build the CUDA kernels
    ("echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9", False),  # a broken driver lists no GPU
    (None, False),  # no nvidia-smi at all
])
def test_makefile_builds_cuda_kernels_when_a_gpu_is_listed(tmp_path, smi, force):
    """`make -n -B install` prints (runs nothing) the install commands the Makefile would run on that machine."""
    path = [str(_fake_nvidia_smi(tmp_path / "bin", smi))] if smi is not None else []
    path += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "nvidia-smi").exists()]
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "DIFFPURE_FAST_NO_CUDA", "MAKEFLAGS")}
    env["PATH"] = os.pathsep.join(path)
    proc = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "install"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    install = [line for line in proc.stdout.splitlines() if "pip install" in line and line.rstrip().endswith("-e .")]
    assert len(install) == 1, proc.stdout
    assert ("FORCE_CUDA=1" in install[0]) is force
    assert "DIFFPURE_FAST_NO_CUDA" not in install[0]  # the Makefile no longer opts out of CUDA by default


# Runs pytest on a scratch directory with this repository's conftest, on a machine that pretends to have a GPU but
# no CUDA kernels (so that the outcome is the same on every machine).
_FAKE_GPU_PYTEST = textwrap.dedent("""
    import sys

    import pytest
    import torch

    torch.cuda.is_available = lambda: True
    from diffpure_fast.ops import _ext

    _ext.cuda_impl = lambda: None
    sys.exit(pytest.main(sys.argv[1:]))
""")

_SKIPPING_TESTS = textwrap.dedent("""
    import pytest

    @pytest.mark.cuda
    def test_cuda_skips():
        pytest.skip("CUDA kernel not available")

    @pytest.mark.cuda
    @pytest.mark.skip(reason="skipped by marker")
    def test_cuda_skip_marker():
        pass

    @pytest.mark.cuda
    def test_cuda_passes():
        assert 1 + 1 == 2

    def test_plain_skip():
        pytest.skip("not cuda-marked: a skip stays a skip")
""")


@pytest.mark.parametrize("no_cuda", [None, "1"])
def test_cuda_skip_on_a_gpu_machine_is_a_failure(tmp_path, no_cuda):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(_SKIPPING_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFPURE_FAST_NO_CUDA", "PYTEST_ADDOPTS")}
    if no_cuda is not None:
        env["DIFFPURE_FAST_NO_CUDA"] = no_cuda
    proc = subprocess.run([sys.executable, "-c", _FAKE_GPU_PYTEST, "-q", "-p", "no:cacheprovider", "-rfs",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    summary = proc.stdout.strip().splitlines()[-1]
    if no_cuda is None:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        # The skip raised in the test body fails it; the one by marker happens at set-up, so pytest calls it an error.
        assert "1 failed, 1 passed, 1 skipped, 1 error" in summary, proc.stdout
        assert proc.stdout.count("CUDA kernels of diffpure_fast._C are not built") >= 2, proc.stdout
    else:  # a CPU-only build was asked for: the skips stay skips
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "1 passed, 3 skipped" in summary, proc.stdout


def _ptxas_log(registers: int, spill_stores: int = 0, spill_loads: int = 0) -> str:
    """A `ptxas -v` report of one kernel, in nvcc 13's format."""
    return (f"ptxas info    : 0 bytes gmem\n"
            f"ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
            f"ptxas info    : Function properties for _Z1kPf\n"
            f"    40 bytes stack frame, {spill_stores} bytes spill stores, {spill_loads} bytes spill loads\n"
            f"ptxas info    : Used {registers} registers, used 0 barriers, 360 bytes cmem[0]\n"
            f"ptxas info    : Compile time = 7.149 ms\n")


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk")
@pytest.mark.parametrize("log, ok", [
    (_ptxas_log(44), True),
    (_ptxas_log(255), True),  # the most __launch_bounds__(256) allows
    (_ptxas_log(256), False),
    (_ptxas_log(40, spill_stores=8), False),
    (_ptxas_log(40, spill_loads=4), False),
    (_ptxas_log(44) + _ptxas_log(40, spill_stores=16), False),  # one bad kernel among good ones
    ("ptxas info    : 0 bytes gmem\n", False),  # no kernel reported: nothing was checked
])
def test_cuda_compile_check_rejects_spills_and_register_overflow(tmp_path, log, ok):
    """scripts/check_cuda_compile.sh's ptxas -v check, on saved reports (no nvcc needed)."""
    path = tmp_path / "ptxas.log"
    path.write_text(log)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda_compile.sh"), "--ptxas-report", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    kernels = log.count("Compiling entry function")
    assert proc.stdout.count("registers,") == kernels
    assert proc.stdout.count("FAIL") == (0 if ok or not kernels else 1)
