"""The fused SDE-step ops: every implementation against the torch reference, the noise contract, dispatch, import.

Implementations: reference (pure torch), cpp (diffpure_fast._C CPU kernel), triton (on CPU tensors under
TRITON_INTERPRET=1 when there is no GPU, see conftest.py) and cuda (diffpure_fast._C CUDA kernel, GPU only).
Every step test runs unguided and guided (the optional additive ``guide``, summed last).
"""

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffpure_fast import noise
from diffpure_fast.ops import IMPL_ENV, _dispatch, _ext, _library, default_impl_name, force_impl, reference, sde_step

SHAPES = [(1, 1, 1, 1), (1, 3, 1, 1), (3, 1, 5, 7), (3, 1, 7, 5), (2, 3, 17, 13), (5, 3, 32, 32)]
DTYPES = [torch.float32, torch.float64]
SEED = 0x0123_4567_89AB_CDEF  # both key words non-zero
COEFFS = (0.9731, -0.123456789, 0.3)

IMPLS = [
    "reference",
    "cpp",
    pytest.param("triton", marks=pytest.mark.triton),
    pytest.param("cuda", marks=pytest.mark.cuda),
]

# Noise tolerance per (implementation, dtype); None: bitwise. float32 noise from the C++ kernel is bit-equal to
# noise.gaussian (libm's float64 Box-Muller, rounded once). In float64 no kernel can be bitwise: torch's own CPU
# float64 log/sqrt/cos/sin (MKL/Sleef) differ from libm's in the last bit for ~1% of values, so 1e-14 (a few
# ulp of |z| < 6.7). Triton/CUDA use libdevice (or numpy under the interpreter): the 1e-6 of the specification.
NOISE_TOL = {
    ("reference", torch.float32): None, ("reference", torch.float64): None,
    ("cpp", torch.float32): None, ("cpp", torch.float64): 1e-14,
    ("triton", torch.float32): 1e-6, ("triton", torch.float64): 1e-12,
    ("cuda", torch.float32): 1e-6, ("cuda", torch.float64): 1e-12,
}


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _impl(name: str):
    module = _dispatch._module(name)
    if module is None:
        pytest.skip(f"{name}: not available here (extension not built, or no GPU)")
    return module


@pytest.fixture
def forced():
    """forced(name): run the public ops on implementation ``name`` (``force_impl``) until the test ends."""
    previous = []

    def force(name):
        previous.append(force_impl(name))

    yield force
    if previous:
        force_impl(previous[0])


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, eps, z = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device) for _ in range(3))
    ids = (torch.arange(shape[0], dtype=torch.int64) * 7 + 3).to(device)
    return x, eps, z, ids


def _guide(x, guided=True):
    """A guidance term like x (its own generator: not one of _inputs' tensors), or None when not guided."""
    if not guided:
        return None
    g = torch.Generator().manual_seed(99)
    return (0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(x.dtype).to(x.device)


def _assert_noise_close(actual, expected, tol):
    if tol is None:
        assert torch.equal(actual, expected), f"max |diff| {(actual - expected).abs().max().item():.3g}"
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", IMPLS)
def test_sde_step_z_matches_reference(name, dtype, shape, guided):
    """Given z, every implementation rounds like the torch expression: bit-equal (no FMA anywhere)."""
    impl = _impl(name)
    x, eps, z, _ = _inputs(shape, dtype, _device(name))
    guide = _guide(x, guided)
    out = impl.sde_step_z(x, eps, z, *COEFFS, guide)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, reference.sde_step_z(x, eps, z, *COEFFS, guide))
    if guided:  # the guide is summed last, each operation rounded: ((a*x + b*eps) + c*z) + guide
        assert torch.equal(out, reference.sde_step_z(x, eps, z, *COEFFS) + guide)


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", IMPLS)
def test_sde_step_z_low_precision_matches_reference(name, dtype, guided):
    """float16/bfloat16: products and sums in float32 (opmath), each rounded to the dtype -- still bit-equal."""
    impl = _impl(name)
    if name == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton's CPU interpreter has no exact bfloat16 (numpy has none): unguided results differ too")
    x, eps, z, _ = _inputs((3, 1, 5, 7), dtype, _device(name))
    guide = _guide(x, guided)
    assert torch.equal(impl.sde_step_z(x, eps, z, *COEFFS, guide), reference.sde_step_z(x, eps, z, *COEFFS, guide))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", IMPLS)
def test_noise_matches_specification(name, dtype, shape):
    """With (a, b, c) = (0, 0, 1) the philox step returns the noise itself: compare with noise.sample_noise."""
    impl = _impl(name)
    x, eps, _, ids = _inputs(shape, dtype, _device(name))
    z = impl.sde_step_philox(x, eps, 0.0, 0.0, 1.0, SEED, ids, 17, noise.STREAM_REVERSE)
    expected = noise.sample_noise(SEED, ids, 17, noise.STREAM_REVERSE, x)
    _assert_noise_close(z, expected, NOISE_TOL[name, dtype])


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", IMPLS)
def test_sde_step_philox_matches_reference(name, dtype, shape, guided):
    impl = _impl(name)
    x, eps, _, ids = _inputs(shape, dtype, _device(name))
    guide = _guide(x, guided)
    out = impl.sde_step_philox(x, eps, *COEFFS, SEED, ids, 3, noise.STREAM_FORWARD, guide)
    expected = reference.sde_step_philox(x, eps, *COEFFS, SEED, ids, 3, noise.STREAM_FORWARD, guide)
    tol = NOISE_TOL[name, dtype]
    if tol is None:
        assert torch.equal(out, expected)
    else:  # c * (noise error) plus one rounding of the result
        torch.testing.assert_close(out, expected, rtol=torch.finfo(dtype).eps, atol=COEFFS[2] * tol)


@pytest.mark.parametrize("name", IMPLS)
def test_noise_is_batch_composition_invariant(name):
    """A sample's noise depends on its id only, not on its batch or its position in it."""
    impl = _impl(name)
    device = _device(name)
    shape = (6, 3, 9, 7)
    zeros = torch.zeros(shape, device=device)
    ids = torch.arange(100, 106, device=device)
    full = impl.sde_step_philox(zeros, zeros, 0.0, 0.0, 1.0, SEED, ids, 5, 1)
    perm = torch.tensor([4, 0, 5, 2], device=device)
    part = impl.sde_step_philox(zeros[:4], zeros[:4], 0.0, 0.0, 1.0, SEED, ids[perm], 5, 1)
    assert torch.equal(part, full[perm])
    one = impl.sde_step_philox(zeros[:1], zeros[:1], 0.0, 0.0, 1.0, SEED, ids[3:4], 5, 1)
    assert torch.equal(one[0], full[3])


@pytest.mark.parametrize("name", IMPLS)
def test_same_seed_replays_bitwise(name):
    impl = _impl(name)
    x, eps, _, ids = _inputs((3, 2, 11, 5), torch.float32, _device(name))
    args = (x, eps, *COEFFS)
    first = impl.sde_step_philox(*args, SEED, ids, 9, 1)
    assert torch.equal(first, impl.sde_step_philox(*args, SEED, ids, 9, 1))
    # Every counter/key word changes the noise.
    for seed, step, stream in ((SEED + 1, 9, 1), (SEED + (1 << 32), 9, 1), (SEED, 10, 1), (SEED, 9, 0)):
        assert not torch.equal(first, impl.sde_step_philox(*args, seed, ids, step, stream))


def test_noise_statistics():
    """Guards the specification itself: mean 0, variance 1 over 2^18 values (5 standard errors)."""
    z = noise.gaussian(SEED, torch.arange(4), 0, 0, 1 << 16, torch.float64)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5


@pytest.mark.parametrize("name", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_kernel_input_checks(name):
    """Each kernel's own checks (called directly, past the dispatcher's other kernels): ValueErrors naming the
    argument -- the C++ kernels raise them with TORCH_CHECK_VALUE."""
    error = ValueError
    impl = _impl(name)
    x, eps, z, ids = _inputs((2, 3, 4, 4), torch.float32, _device(name))
    with pytest.raises(error, match="shape"):
        impl.sde_step_z(x, eps[:1], z, *COEFFS)
    with pytest.raises(error, match="dtype"):
        impl.sde_step_z(x, eps.double(), z, *COEFFS)
    with pytest.raises(error, match="sample_ids"):
        impl.sde_step_philox(x, eps, *COEFFS, SEED, ids[:1], 0, 0)
    with pytest.raises(error, match="sample_ids"):
        impl.sde_step_philox(x, eps, *COEFFS, SEED, ids.int(), 0, 0)
    with pytest.raises((error, ValueError), match="seed"):
        impl.sde_step_philox(x, eps, *COEFFS, -1, ids, 0, 0)
    # A guide unlike x (shape, dtype, device: a meta tensor among CPU ones) is named in the error.
    for bad in (x[:1], x.double(), torch.empty_like(x, device="meta")):
        with pytest.raises(error, match="guide"):
            impl.sde_step_z(x, eps, z, *COEFFS, bad)
        with pytest.raises(error, match="guide"):
            impl.sde_step_philox(x, eps, *COEFFS, SEED, ids, 0, 0, bad)


@pytest.mark.parametrize("name", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_public_op_checks_guide(name, forced):
    """Every implementation checks the guide before it computes (the reference would broadcast/promote), with the
    same ValueError."""
    _impl(name)
    forced(name)
    x, eps, z, ids = _inputs((2, 3, 4, 4), torch.float32, _device(name))
    for bad, what in ((x[:, :1], "shape"), (x.double(), "float64"), (torch.empty_like(x, device="meta"), "meta")):
        with pytest.raises(ValueError, match=f"guide must have .*{what}"):
            sde_step(x, eps, *COEFFS, z=z, guide=bad)
        with pytest.raises(ValueError, match=f"guide must have .*{what}"):
            sde_step(x, eps, *COEFFS, seed=SEED, sample_ids=ids, guide=bad)


@pytest.mark.parametrize("name", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_non_contiguous_inputs(name):
    impl = _impl(name)
    x, eps, z, ids = _inputs((4, 3, 6, 5), torch.float32, _device(name))
    xt, et, zt = (t.transpose(2, 3) for t in (x, eps, z))
    assert torch.equal(impl.sde_step_z(xt, et, zt, *COEFFS), reference.sde_step_z(xt, et, zt, *COEFFS))
    out = impl.sde_step_philox(xt, et, *COEFFS, SEED, ids, 1, 1)
    torch.testing.assert_close(out, reference.sde_step_philox(xt, et, *COEFFS, SEED, ids, 1, 1), rtol=0,
                               atol=1e-6)
    # A non-contiguous guide, with contiguous and with non-contiguous other inputs.
    gt = _guide(x).transpose(2, 3)
    assert not gt.is_contiguous()
    for xs, es, zs in ((xt, et, zt), (xt.contiguous(), et.contiguous(), zt.contiguous())):
        assert torch.equal(impl.sde_step_z(xs, es, zs, *COEFFS, gt), reference.sde_step_z(xs, es, zs, *COEFFS, gt))
        out = impl.sde_step_philox(xs, es, *COEFFS, SEED, ids, 1, 1, gt)
        torch.testing.assert_close(out, reference.sde_step_philox(xs, es, *COEFFS, SEED, ids, 1, 1, gt), rtol=0,
                                   atol=1e-6)


LAYOUTS = ["contiguous", "channels_last", "transposed", "strided", "mixed"]


def _layout(tensors, layout):
    """The same values in another memory layout: channels_last, a transposed view, a strided (non-dense) view, or
    mixed (x channels_last, the others contiguous). Views change the shape, identically for every tensor."""
    if layout == "channels_last":
        return [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    if layout == "transposed":
        return [t.transpose(2, 3) for t in tensors]
    if layout == "strided":
        return [t[:, :, ::2] for t in tensors]
    if layout == "mixed":
        return [tensors[0].contiguous(memory_format=torch.channels_last), *tensors[1:]]
    return list(tensors)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", IMPLS)
def test_every_implementation_returns_a_contiguous_output(name, layout):
    """The layout contract of _library: a contiguous output whatever the inputs' strides, like the fake kernels
    (the reference alone used to keep a channels_last or transposed x's layout)."""
    impl = _impl(name)
    x, eps, z, ids = _inputs((2, 3, 6, 5), torch.float32, _device(name))
    x, eps, z, guide = _layout([x, eps, z, _guide(x)], layout)
    assert layout == "contiguous" or not x.is_contiguous()
    for g in (None, guide):
        out = impl.sde_step_z(x, eps, z, *COEFFS, g)
        assert out.is_contiguous() and out.shape == x.shape
        assert torch.equal(out, reference.sde_step_z(x.contiguous(), eps.contiguous(), z.contiguous(), *COEFFS,
                                                     None if g is None else g.contiguous()))
        out = impl.sde_step_philox(x, eps, *COEFFS, SEED, ids, 4, 1, g)
        assert out.is_contiguous() and out.shape == x.shape


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl_name", IMPLS)
def test_opcheck(impl_name, layout, forced):
    """Schema, fake (meta) and autograd registrations of both public ops, run through every implementation with
    contiguous, channels_last and non-contiguous inputs: the fake kernels' strides must be the real outputs'."""
    _impl(impl_name)
    forced(impl_name)
    x, eps, z, ids = _inputs((2, 3, 5, 7), torch.float32, _device(impl_name))
    x, eps, z, guide = _layout([x, eps, z, _guide(x)], layout)
    xg, eg, zg, gg = (t.detach().clone().requires_grad_() for t in (x, eps, z, guide))
    # guide absent (default), None, given, and given with a gradient.
    for args in ((x, eps, z, *COEFFS), (xg, eg, zg, *COEFFS, None), (x, eps, z, *COEFFS, guide),
                 (xg, eg, zg, *COEFFS, gg)):
        torch.library.opcheck(torch.ops.diffpure_fast.sde_step_z.default, args)
    philox = (*COEFFS, SEED, ids, 4, 1)
    for args in ((x, eps, *philox), (xg, eg, *philox, None), (x, eps, *philox, guide), (xg, eg, *philox, gg)):
        torch.library.opcheck(torch.ops.diffpure_fast.sde_step_philox.default, args)


@pytest.mark.parametrize("name", IMPLS)
def test_public_op_checks_sample_ids(name, forced):
    """One rule for every implementation: sample_ids (B,) int64 in [0, 2^32) (a wider id would wrap onto another
    id's noise). On CPU tensors an id out of range is a ValueError naming them; on GPU tensors, where checking the
    values would synchronise every step, that sample's output is NaN and the others' are unchanged."""
    _impl(name)
    forced(name)
    x, eps, _, ids = _inputs((3, 2, 4, 4), torch.float32, _device(name))
    for bad in (-1, 1 << 32, (1 << 63) - 1, -(1 << 63)):
        bad_ids = ids.clone()
        bad_ids[1] = bad
        for guide in (None, _guide(x)):
            if x.device.type == "cpu":
                with pytest.raises(ValueError, match=r"sample_ids must be in \[0, 2\^32\).*" + str(bad)):
                    sde_step(x, eps, *COEFFS, seed=SEED, sample_ids=bad_ids, guide=guide)
                continue
            out = sde_step(x, eps, *COEFFS, seed=SEED, sample_ids=bad_ids, guide=guide)
            good = sde_step(x, eps, *COEFFS, seed=SEED, sample_ids=ids, guide=guide)
            assert out[1].isnan().all() and torch.equal(out[0::2], good[0::2])
    for bad_ids, what in ((ids[:1], r"\(1,\)"), (ids.float(), "float32"), (ids.to("meta"), "meta")):
        with pytest.raises(ValueError, match=f"sample_ids must be .*{what}"):
            torch.ops.diffpure_fast.sde_step_philox(x, eps, *COEFFS, SEED, bad_ids, 0, 1)
    # The ends of the range are valid ids, with finite noise equal to the specification's.
    edge_ids = torch.tensor([0, (1 << 32) - 1, 5], device=x.device)
    out = sde_step(x, eps, 0.0, 0.0, 1.0, seed=SEED, sample_ids=edge_ids, step=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, noise.sample_noise(SEED, edge_ids, 2, noise.STREAM_REVERSE, x), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("name", [n for n in IMPLS if n != "cpp"])
def test_kernels_write_nan_for_an_out_of_range_id(name):
    """The kernels themselves (no checks in front, as a GPU call runs them): a sample whose id lies outside
    [0, 2^32) gets NaN, never the noise of the id it would wrap onto; the other samples are unchanged."""
    impl = _impl(name)
    x, eps, _, ids = _inputs((3, 2, 4, 5), torch.float32, _device(name))
    good = impl.sde_step_philox(x, eps, *COEFFS, SEED, ids, 3, 1)
    for bad in (-1, 1 << 32, (1 << 32) + int(ids[1])):
        bad_ids = ids.clone()
        bad_ids[1] = bad
        out = impl.sde_step_philox(x, eps, *COEFFS, SEED, bad_ids, 3, 1)
        assert out[1].isnan().all() and torch.equal(out[0::2], good[0::2])


@pytest.mark.triton
def test_triton_device_guard():
    """Triton launches on the current CUDA device: the launchers make x's device current, and only for CUDA."""
    from diffpure_fast.ops import triton_sde

    guard = triton_sde._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # constructing it touches no GPU
    assert isinstance(triton_sde._device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.triton
def test_triton_launches_go_through_the_device_guard(monkeypatch):
    """Both launchers launch inside _device_guard(x.device) (checked by recording the guards active at launch)."""
    from diffpure_fast.ops import triton_sde

    _impl("triton")
    active, launched = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    class RecordingKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                launched.append(list(active))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(triton_sde, "_device_guard", recording_guard)
    for kernel in ("_sde_step_z_kernel", "_sde_step_philox_kernel"):
        monkeypatch.setattr(triton_sde, kernel, RecordingKernel(getattr(triton_sde, kernel)))
    x, eps, z, ids = _inputs((2, 1, 3, 5), torch.float32, _device("triton"))
    assert torch.equal(triton_sde.sde_step_z(x, eps, z, *COEFFS), reference.sde_step_z(x, eps, z, *COEFFS))
    out = triton_sde.sde_step_philox(x, eps, *COEFFS, SEED, ids, 1, 1)
    torch.testing.assert_close(out, reference.sde_step_philox(x, eps, *COEFFS, SEED, ids, 1, 1), rtol=0, atol=1e-6)
    assert launched == [[x.device], [x.device]]


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
def test_kernels_run_on_the_device_of_x(name):
    """x on the last GPU while cuda:0 is current: the result is computed there, and equals the reference."""
    impl = _impl(name)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    x, eps, z, ids = _inputs((3, 2, 9, 7), torch.float32, device)
    guide = _guide(x)
    with torch.cuda.device(0):
        out_z = impl.sde_step_z(x, eps, z, *COEFFS, guide)
        out_p = impl.sde_step_philox(x, eps, *COEFFS, SEED, ids, 3, 1, guide)
    assert out_z.device == device and out_p.device == device
    torch.cuda.synchronize(device)
    assert torch.equal(out_z, reference.sde_step_z(x, eps, z, *COEFFS, guide))
    torch.testing.assert_close(out_p, reference.sde_step_philox(x, eps, *COEFFS, SEED, ids, 3, 1, guide), rtol=0,
                               atol=1e-6)


LOW_DTYPES = [torch.float16, torch.bfloat16]
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def _interpreted_bf16(name, dtype):
    """Triton's CPU interpreter truncates float32 -> bfloat16 casts (numpy has no bfloat16) instead of rounding."""
    return name == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |t| (float64), from the binade of t; the smallest normal spacing near 0."""
    mantissa, exponent = torch.frexp(t.double().abs())  # |t| = mantissa * 2^exponent, mantissa in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(mantissa), exponent - 1 - _MANTISSA_BITS[dtype])
    return torch.clamp(ulp, min=torch.finfo(dtype).tiny * torch.finfo(dtype).eps)


def _assert_within_ulps(actual, expected, ulps):
    """|actual - expected| <= ulps spacings of the dtype at the larger magnitude of the two, elementwise."""
    bound = ulps * _ulp(torch.maximum(actual.double().abs(), expected.double().abs()), actual.dtype)
    diff = (actual.double() - expected.double()).abs()
    assert (diff <= bound).all(), f"{int((diff > bound).sum())} elements beyond {ulps} ulp, max |diff| {diff.max()}"


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("name", IMPLS)
def test_noise_low_precision(name, dtype):
    """float16/bfloat16 noise is the implementation's float64 noise rounded once through float32 (torch's float64
    -> float16/bfloat16 copy): bit-equal to it, one ulp under the interpreter's truncating bfloat16 cast. Against
    the specification: bit-equal for reference and cpp, one more ulp for triton and cuda, whose float64 noise is
    within 1e-6 and may fall on the other side of a rounding boundary."""
    impl = _impl(name)
    x, eps, _, ids = _inputs((3, 2, 19, 7), dtype, _device(name))
    z = impl.sde_step_philox(x, eps, 0.0, 0.0, 1.0, SEED, ids, 17, noise.STREAM_REVERSE)
    assert z.dtype == dtype and z.shape == x.shape and torch.isfinite(z).all()
    own = impl.sde_step_philox(x.double(), eps.double(), 0.0, 0.0, 1.0, SEED, ids, 17, noise.STREAM_REVERSE)
    truncated = _interpreted_bf16(name, dtype)
    if truncated:
        _assert_within_ulps(z, own.to(dtype), 1)
    else:
        assert torch.equal(z, own.to(dtype))
    spec = noise.sample_noise(SEED, ids, 17, noise.STREAM_REVERSE, x)
    if name in ("reference", "cpp"):
        assert torch.equal(z, spec)
    else:
        _assert_within_ulps(z, spec, 2 if truncated else 1)


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("name", IMPLS)
def test_sde_step_philox_low_precision(name, dtype, guided):
    """The float16/bfloat16 philox step is the z-given step on the implementation's own noise, bit for bit
    (products and sums in float32, each rounded to the dtype). Under the interpreter's truncating bfloat16 casts
    each of the 5-6 roundings may be off by one ulp of its result: the bound is twice their sum."""
    impl = _impl(name)
    x, eps, _, ids = _inputs((3, 2, 19, 7), dtype, _device(name))
    guide = _guide(x, guided)
    z = impl.sde_step_philox(x, eps, 0.0, 0.0, 1.0, SEED, ids, 3, noise.STREAM_FORWARD)
    out = impl.sde_step_philox(x, eps, *COEFFS, SEED, ids, 3, noise.STREAM_FORWARD, guide)
    expected = reference.sde_step_z(x, eps, z, *COEFFS, guide)
    if not _interpreted_bf16(name, dtype):
        assert torch.equal(out, expected)
        return
    a, b, c = COEFFS
    ax, be, cz = (t.double() * k for t, k in ((x, a), (eps, b), (z, c)))
    terms = [ax, be, ax + be, cz, ax + be + cz]
    if guide is not None:
        terms.append(ax + be + cz + guide.double())
    bound = 2 * torch.finfo(dtype).eps * sum(t.abs() for t in terms)
    diff = (out.double() - expected.double()).abs()
    assert (diff <= bound).all(), f"max |diff| {diff.max()}, bound there {bound.flatten()[diff.argmax()]}"


@pytest.mark.parametrize("noise_from", ["z", "philox"])
def test_public_sde_step_gradients(noise_from):
    x, eps, z, ids = _inputs((2, 3, 4, 4), torch.float64, "cpu")
    guide = _guide(x).requires_grad_()
    x.requires_grad_()
    eps.requires_grad_()
    a, b, c = COEFFS
    noise_args = {"z": z} if noise_from == "z" else {"seed": SEED, "sample_ids": ids, "step": 2}
    out = sde_step(x, eps, a, b, c, **noise_args)
    gx, ge = torch.autograd.grad(out.sum(), (x, eps))
    assert torch.equal(gx, torch.full_like(x, a)) and torch.equal(ge, torch.full_like(eps, b))
    # Guided: d/d guide is the incoming gradient itself (identity), the others unchanged.
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    out = sde_step(x, eps, a, b, c, guide=guide, **noise_args)
    gx, ge, gg = torch.autograd.grad(out, (x, eps, guide), grad_out)
    assert torch.equal(gg, grad_out)
    assert torch.equal(gx, grad_out * a) and torch.equal(ge, grad_out * b)


def test_public_op_under_torch_compile():
    """torch.compile traces ops.sde_step in one graph (the ops' fake kernels, registered from Python for the C++
    schemas) and its output and gradient are eager's, with a channels_last input."""
    x, eps, _, ids = _inputs((2, 3, 6, 5), torch.float32, "cpu")
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()

    def two_steps(x):
        y = sde_step(x, eps, *COEFFS, seed=SEED, sample_ids=ids, step=1)
        return sde_step(y, eps, *COEFFS, z=y, guide=x)

    expected = two_steps(x)
    out = torch.compile(two_steps, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(out, expected) and out.is_contiguous()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(out, x, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    assert torch.equal(grad, expected_grad)


def test_default_dispatch(forced):
    forced(None)
    expected = "cpp" if _dispatch.available("cpp") else "reference"
    assert default_impl_name(torch.device("cpu")) == expected
    if torch.cuda.is_available():
        cuda = "cuda" if _dispatch.available("cuda") else "triton" if _dispatch.available("triton") else "reference"
        assert default_impl_name(torch.device("cuda")) == cuda


@pytest.mark.parametrize("name", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_force_impl_runs_that_implementation(name, forced, monkeypatch):
    """force_impl shadows the default kernels (the C++ ones included) and force_impl(None) brings them back."""
    _impl(name)
    x, eps, z, ids = _inputs((2, 1, 3, 3), torch.float32, _device(name))
    expected = reference.sde_step_z(x, eps, z, *COEFFS)
    ran = []  # the Python implementations that ran (the registered kernels look them up on each call)

    def recording(name, fn):
        def run(*args):
            ran.append(name)
            return fn(*args)

        return run

    for op in ("sde_step_z", "sde_step_philox"):
        monkeypatch.setattr(reference, op, recording("reference", getattr(reference, op)))
    monkeypatch.setattr(_dispatch, "_triton", recording("triton", _dispatch._triton))
    forced(f" {name.upper()} ")
    assert _dispatch.forced_impl() == name and default_impl_name(x.device) == name
    assert torch.equal(sde_step(x, eps, *COEFFS, z=z), expected)
    sde_step(x, eps, *COEFFS, seed=SEED, sample_ids=ids)
    assert set(ran) == ({name} if name != "cpp" else set())
    if _dispatch.available("cpp"):  # back to the default: the C++ CPU kernel, no Python kernel runs
        ran.clear()
        force_impl(None)
        x, eps, z, ids = _inputs((2, 1, 3, 3), torch.float32, "cpu")
        sde_step(x, eps, *COEFFS, z=z)
        sde_step(x, eps, *COEFFS, seed=SEED, sample_ids=ids)
        assert ran == [] and default_impl_name(x.device) == "cpp"


def test_force_impl_rejects_unknown_name(forced):
    with pytest.raises(ValueError, match=IMPL_ENV):
        forced("fortran")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is present")
def test_forced_impl_unavailable_here(forced):
    forced("cuda")
    x = torch.zeros(1, 2)
    with pytest.raises(RuntimeError, match=f"{IMPL_ENV}=cuda: .*cuda tensors only"):
        sde_step(x, x, 1.0, 0.0, 0.0, z=x)
    with pytest.raises(RuntimeError, match=f"{IMPL_ENV}=cuda"):
        torch.ops.diffpure_fast.sde_step_philox(x, x, 1.0, 0.0, 0.0, 1, torch.arange(1), 0, 0)


def _python(script: str, **env_updates) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != IMPL_ENV}
    env.update(OMP_NUM_THREADS="1", **env_updates)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


_ENV_OVERRIDE = textwrap.dedent("""
    import torch
    import diffpure_fast
    from diffpure_fast.ops import default_impl_name, forced_impl, reference, sde_step

    calls = []
    step_z = reference.sde_step_z
    reference.sde_step_z = lambda *args: calls.append(1) or step_z(*args)
    assert forced_impl() == "reference" and default_impl_name(torch.device("cpu")) == "reference"
    x = torch.ones(2, 3)
    sde_step(x, x, 1.0, 1.0, 1.0, z=x)
    assert calls == [1], calls
    print("ok")
""")

_ENV_UNKNOWN = textwrap.dedent("""
    import torch
    import diffpure_fast
    from diffpure_fast.ops import default_impl_name, sde_step

    for call in (lambda: default_impl_name(torch.device("cpu")), lambda: sde_step(torch.ones(1), torch.ones(1), 1.0,
                                                                                  0.0, 0.0, z=torch.ones(1))):
        try:
            call()
        except ValueError as exc:
            assert "DIFFPURE_FAST_IMPL" in str(exc) and "fortran" in str(exc), exc
        else:
            raise AssertionError("no error")
    print("ok")
""")


def test_env_override_is_applied_at_import():
    """DIFFPURE_FAST_IMPL in the environment forces the implementation of every call (read at import)."""
    proc = _python(_ENV_OVERRIDE, **{IMPL_ENV: " Reference "})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_env_override_unknown_value():
    """An unknown value does not break the import; every call, and default_impl_name, raise a ValueError."""
    proc = _python(_ENV_UNKNOWN, **{IMPL_ENV: "fortran"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def _dispatch_table(op: str) -> dict[str, str]:
    """Dispatch key -> where its kernel was registered, from the dispatcher's own table."""
    table = {}
    for line in torch._C._dispatch_dump_table(f"diffpure_fast::{op}").splitlines():
        key, sep, where = line.partition(":")
        if sep:
            table[key.strip()] = where.strip()
    return table


@pytest.mark.parametrize("op", sorted(_library.SCHEMAS))
def test_cpp_registration_is_used_when_built(op, forced):
    """The extension-cpp pattern: with diffpure_fast._C built, the schema and the CPU kernel come from C++, the fake
    and autograd kernels from _library, and there is no torch.library.custom_op (a Python wrapper) for the op."""
    if not _ext.has_kernel("CPU"):
        pytest.skip(f"diffpure_fast._C is not built: {_ext.load_error()}")
    forced(None)
    overload = getattr(torch.ops.diffpure_fast, op).default
    assert str(overload._schema) == f"diffpure_fast::{_library.SCHEMAS[op]}"  # the Python copy agrees
    assert not overload._defined_in_python
    assert torch._library.custom_ops._maybe_get_opdef(f"diffpure_fast::{op}") is None
    table = _dispatch_table(op)
    assert "csrc/diffpure_fast.cpp" in table["CPU"] and table["CPU"].endswith("[kernel]"), table["CPU"]
    for key in ("Meta", "AutogradCPU"):
        assert "diffpure_fast/ops/_library.py" in table[key], (key, table[key])
    if _ext.has_kernel("CUDA"):
        assert "csrc/cuda/sde_step.cu" in table["CUDA"], table["CUDA"]
    else:  # the Triton kernel (or the reference without triton), registered from Python
        assert "diffpure_fast/ops/_library.py" in table["CUDA"], table["CUDA"]
    # force_impl shadows the C++ kernel with a Python one, and gives it back.
    force_impl("reference")
    assert "diffpure_fast/ops/_dispatch.py" in _dispatch_table(op)["CPU"]
    force_impl(None)
    assert "csrc/diffpure_fast.cpp" in _dispatch_table(op)["CPU"]


_FIRST_CALL = textwrap.dedent("""
    import sys, time

    import torch
    import diffpure_fast
    from diffpure_fast.ops import default_impl_name, sde_step

    x = torch.ones(2, 3, 8, 8)
    t0 = time.perf_counter()
    sde_step(x, x, 1.0, 1.0, 1.0, seed=1, sample_ids=torch.arange(2))
    seconds = time.perf_counter() - t0
    sde_step(x, x, 1.0, 1.0, 1.0, z=x, guide=x)
    print(default_impl_name(x.device), "torch._dynamo" in sys.modules, seconds)
""")


@pytest.mark.parametrize("extension", ["built", "missing"])
def test_first_call_does_not_import_dynamo(extension):
    """The first step call of a fresh process imports nothing heavy: torch._dynamo (what the custom_op wrapper
    imported on first use, ~1 s of the 0.99 s first call) stays out, with or without the extension."""
    script = (_BLOCK_EXTENSION if extension == "missing" else "") + _FIRST_CALL
    proc = _python(script)
    assert proc.returncode == 0, proc.stderr
    impl, dynamo, _ = proc.stdout.split()
    if extension == "missing":
        assert impl == "reference"
    assert dynamo == "False"


_BLOCK_EXTENSION = textwrap.dedent("""
    import importlib.abc, sys

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "diffpure_fast._C":
                raise ImportError("blocked by the test: diffpure_fast._C is not built")
            return None

    sys.meta_path.insert(0, BlockExtension())
""")

_NO_EXTENSION = _BLOCK_EXTENSION + textwrap.dedent("""
    import torch.utils.cpp_extension as cpp_extension

    def no_build(*args, **kwargs):
        raise AssertionError("diffpure_fast compiled code at import or call time")

    cpp_extension.load = cpp_extension.load_inline = no_build

    import torch
    import diffpure_fast
    from diffpure_fast.ops import _ext, _library, default_impl_name, reference, sde_step

    assert "diffpure_fast._C" not in sys.modules and "triton" not in sys.modules, "imported eagerly"
    assert _ext.cpu_impl() is None and _ext.cuda_impl() is None and _ext.load_error()
    assert default_impl_name(torch.device("cpu")) == "reference"
    x = torch.ones(2, 3)
    out = sde_step(x, x, 1.0, 1.0, 1.0, seed=1, sample_ids=torch.arange(2))
    assert out.shape == x.shape

    # The fallback: the schemas defined from Python (the same strings), the reference as the CPU kernel, the same
    # checks and registrations (opcheck, with a channels_last x).
    for name, schema in _library.SCHEMAS.items():
        overload = getattr(torch.ops.diffpure_fast, name).default
        assert str(overload._schema) == "diffpure_fast::" + schema and overload._defined_in_python
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 3, 5, 7, generator=g).contiguous(memory_format=torch.channels_last) for _ in "xez")
    ids = torch.tensor([3, 10])
    out = sde_step(x, eps, 0.9, -0.1, 0.3, seed=5, sample_ids=ids, step=2, stream=0)
    assert out.is_contiguous() and torch.equal(out, reference.sde_step_philox(x, eps, 0.9, -0.1, 0.3, 5, ids, 2, 0))
    torch.library.opcheck(torch.ops.diffpure_fast.sde_step_z.default, (x, eps, z, 0.9, -0.1, 0.3, None))
    torch.library.opcheck(torch.ops.diffpure_fast.sde_step_philox.default, (x, eps, 0.9, -0.1, 0.3, 5, ids, 2, 0))
    try:
        sde_step(x, eps, 0.9, -0.1, 0.3, seed=5, sample_ids=torch.tensor([3, 1 << 32]))
    except ValueError as exc:
        assert "sample_ids must be in [0, 2^32)" in str(exc), exc
    else:
        raise AssertionError("no error for an id >= 2^32")
    print("ok")
""")


def test_import_without_extension_compiles_nothing():
    proc = _python(_NO_EXTENSION)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
