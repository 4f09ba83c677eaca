"""Triton kernels for the fused SDE step: ``a*x + b*eps + c*z [+ guide]``, with ``z`` given or generated in-kernel.

An optional guide (guided purification) is added last, ``((a*x + b*eps) + c*z) + guide``, in the same kernel: the
constexpr HAS_GUIDE selects it (absent, x's pointer stands in for the guide's and is never read).

The in-kernel noise is Philox4x32-10 on uint32 words (``tl.umulhi``) and a float64 Box-Muller, per the counter
specification of ``diffpure_fast.noise``; it matches ``noise.gaussian`` within 1e-6 (libdevice, not libm, supplies
log/sqrt/cos/sin). On CPU tensors the kernels run under ``TRITON_INTERPRET=1``, which must be set before this
module is imported (that is how the tests exercise them without a GPU). ``impl()`` is None when triton is missing.
"""

from __future__ import annotations

import contextlib

import torch

from ..noise import check_seed

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional dependency
    triton = None

__all__ = ["HAS_TRITON", "impl", "sde_step_philox", "sde_step_z"]

HAS_TRITON = triton is not None

_MASK32 = 0xFFFFFFFF
# Elements per program for the z-given step: 1024 elements = 4 warps x 32 threads x 8 elements, i.e. two 16-byte
# float32 vectors per tensor per thread -- the triton tutorial-01 choice for a bandwidth-bound elementwise kernel.
BLOCK = 1024
# Philox calls per program for the noisy step: 256 calls = 1024 elements, the same tile as BLOCK; the float64
# Box-Muller keeps ~4 float64 temporaries per element live, so a larger tile would spill registers.
BLOCK_Q = 256

if HAS_TRITON:

    @triton.jit
    def _philox4x32_10(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 (Random123 constants) on uint32 tensors; the key is bumped before rounds 1..9."""
        for r in tl.static_range(10):
            if r > 0:
                k0 = k0 + 0x9E3779B9
                k1 = k1 + 0xBB67AE85
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo0 = c0 * 0xD2511F53
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            lo1 = c2 * 0xCD9E8D57
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        return c0, c1, c2, c3

    @triton.jit
    def _box_muller(w_even, w_odd):
        """(r cos 2 pi v, r sin 2 pi v) in float64 with u = (w_even + 1) / 2^32, v = w_odd / 2^32."""
        # Explicit float64 constants: a bare Python float would enter as float32 (2 pi off by 1.7e-7).
        two_pi = tl.full((), 6.283185307179586, tl.float64)
        inv_2_32 = tl.full((), 2.3283064365386963e-10, tl.float64)
        u = (w_even.to(tl.float64) + 1.0) * inv_2_32
        v = w_odd.to(tl.float64) * inv_2_32
        r = tl.sqrt(-2.0 * tl.log(u))
        theta = two_pi * v
        return r * tl.cos(theta), r * tl.sin(theta)

    @triton.jit
    def _step(x, eps, z, a, b, c, COMPUTE: tl.constexpr):
        """(a*x + b*eps) + c*z with every product and sum rounded to x's dtype, as torch evaluates it."""
        dt = x.dtype
        ax = (x.to(COMPUTE) * a).to(dt)
        be = (eps.to(COMPUTE) * b).to(dt)
        s = (ax.to(COMPUTE) + be.to(COMPUTE)).to(dt)
        cz = (z.to(COMPUTE) * c).to(dt)
        return (s.to(COMPUTE) + cz.to(COMPUTE)).to(dt)

    @triton.jit
    def _guided(step, guide_ptr, offs, mask, COMPUTE: tl.constexpr, HAS_GUIDE: tl.constexpr):
        """step + guide rounded to step's dtype when HAS_GUIDE (the guide is summed last), else step itself."""
        if HAS_GUIDE:
            guide = tl.load(guide_ptr + offs, mask=mask)
            step = (step.to(COMPUTE) + guide.to(COMPUTE)).to(step.dtype)
        return step

    @triton.jit
    def _sde_step_z_kernel(
        x_ptr,  # *Pointer* to x, n contiguous elements
        eps_ptr,  # *Pointer* to eps, like x
        z_ptr,  # *Pointer* to z, like x
        guide_ptr,  # *Pointer* to the guide, like x (read only when HAS_GUIDE)
        out_ptr,  # *Pointer* to the output, like x
        n,  # number of elements
        a: tl.float64,  # coefficients, rounded to COMPUTE in the kernel as torch rounds a Python scalar
        b: tl.float64,
        c: tl.float64,
        COMPUTE: tl.constexpr,  # x's dtype, or float32 for float16/bfloat16 (torch's opmath type)
        HAS_GUIDE: tl.constexpr,  # add the guide after the step
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # tl.full(..., float64) keeps the coefficient exact under the interpreter too (a Python float would be fp32).
        a = tl.full((), a, tl.float64).to(COMPUTE)
        b = tl.full((), b, tl.float64).to(COMPUTE)
        c = tl.full((), c, tl.float64).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask)
        eps = tl.load(eps_ptr + offs, mask=mask)
        z = tl.load(z_ptr + offs, mask=mask)
        out = _guided(_step(x, eps, z, a, b, c, COMPUTE), guide_ptr, offs, mask, COMPUTE, HAS_GUIDE)
        tl.store(out_ptr + offs, out, mask=mask)

    # Key and counter words are not specialised: a value of 1 would otherwise become a constexpr (a recompile).
    @triton.jit(do_not_specialize=["k0", "k1", "step", "stream"])
    def _sde_step_philox_kernel(
        x_ptr,  # *Pointer* to x, (B, n) contiguous
        eps_ptr,  # *Pointer* to eps, like x
        guide_ptr,  # *Pointer* to the guide, like x (read only when HAS_GUIDE)
        out_ptr,  # *Pointer* to the output, like x
        ids_ptr,  # *Pointer* to the (B,) int64 sample ids
        n,  # elements per sample
        blocks_per_sample,  # programs per sample: cdiv(n, 4 * BLOCK_Q)
        a: tl.float64,
        b: tl.float64,
        c: tl.float64,
        k0,  # Philox key: seed mod 2^32
        k1,  # seed >> 32
        step,  # counter word 2, already reduced mod 2^32
        stream,  # counter word 3, already reduced mod 2^32
        COMPUTE: tl.constexpr,
        HAS_GUIDE: tl.constexpr,
        BLOCK_Q: tl.constexpr,  # Philox calls per program; the program covers 4 * BLOCK_Q elements of one sample
    ):
        pid = tl.program_id(0).to(tl.int64)
        i = pid // blocks_per_sample
        blk = pid - i * blocks_per_sample
        q = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)
        zero = tl.zeros((BLOCK_Q,), dtype=tl.uint32)
        sid = tl.load(ids_ptr + i)
        sample_id = sid.to(tl.uint32)
        w0, w1, w2, w3 = _philox4x32_10(q.to(tl.uint32), zero + sample_id, zero + step.to(tl.uint32),
                                        zero + stream.to(tl.uint32), k0.to(tl.uint32), k1.to(tl.uint32))
        z0, z1 = _box_muller(w0, w1)
        z2, z3 = _box_muller(w2, w3)
        # Lane k of call q is element 4q + k: join to (BLOCK_Q, 2, 2) so that the row-major reshape interleaves
        # z0 z1 z2 z3, and the loads/stores below stay contiguous (vectorisable) rather than stride-4.
        zq = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (4 * BLOCK_Q,))
        # An id outside [0, 2^32) would wrap onto another id's noise: its sample's output is NaN instead (its range
        # is not checked on the host, which would cost a synchronisation per step).
        zq = tl.where((sid < 0) | (sid > 0xFFFFFFFF), float("nan"), zq)
        e = blk * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
        mask = e < n
        offs = i * n + e
        a = tl.full((), a, tl.float64).to(COMPUTE)
        b = tl.full((), b, tl.float64).to(COMPUTE)
        c = tl.full((), c, tl.float64).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask)
        eps = tl.load(eps_ptr + offs, mask=mask)
        # float64 -> COMPUTE -> x's dtype: the rounding path of torch's float64 -> float16/bfloat16 copy.
        z = zq.to(COMPUTE).to(x.dtype)
        out = _guided(_step(x, eps, z, a, b, c, COMPUTE), guide_ptr, offs, mask, COMPUTE, HAS_GUIDE)
        tl.store(out_ptr + offs, out, mask=mask)


def _device_guard(device: torch.device):
    """The context every launch runs in: x's device made current for CUDA tensors, nothing for CPU ones.

    A Triton launch goes to the *current* CUDA device and its current stream, not to the device of its pointer
    arguments: without this guard x on cuda:1 while cuda:0 is current launches on cuda:0 (an illegal address, or
    a race with cuda:1's stream). Under TRITON_INTERPRET=1 the CPU tensors need no guard."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """x a floating (B, ...) tensor and every other tensor like it; None (an absent guide) passes."""
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x: expected a floating (B, ...) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    for name, t in others.items():
        if t is None:
            continue
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: expected the shape, dtype and device of x {tuple(x.shape)}, {x.dtype}, "
                             f"{x.device}; got {tuple(t.shape)}, {t.dtype}, {t.device}")


def sde_step_z(x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, a: float, b: float, c: float,
               guide: torch.Tensor | None = None) -> torch.Tensor:
    """``a*x + b*eps + c*z [+ guide]``; x, eps, z (and guide): (B, ...) of one shape, dtype and device."""
    _check(x, eps=eps, z=z, guide=guide)
    xc, ec, zc = x.contiguous(), eps.contiguous(), z.contiguous()
    gc = xc if guide is None else guide.contiguous()  # x stands in for an absent guide; HAS_GUIDE=False skips it
    out = torch.empty_like(xc)
    n = xc.numel()
    if n:
        with _device_guard(x.device):
            _sde_step_z_kernel[(triton.cdiv(n, BLOCK),)](
                xc, ec, zc, gc, out, n, float(a), float(b), float(c), COMPUTE=_compute_dtype(x.dtype),
                HAS_GUIDE=guide is not None, BLOCK=BLOCK,
                enable_fp_fusion=False,  # no FMA: the products round as in the torch reference
            )
    return out


def sde_step_philox(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, c: float, seed: int,
                    sample_ids: torch.Tensor, step: int, stream: int,
                    guide: torch.Tensor | None = None) -> torch.Tensor:
    """``a*x + b*eps + c*z [+ guide]`` with z the counter noise of (seed, sample_ids, step, stream).

    sample_ids: (B,) int64; guide: optional, like x, added last."""
    _check(x, eps=eps, guide=guide)
    check_seed(seed)
    if sample_ids.shape != (x.shape[0],) or sample_ids.dtype != torch.int64 or sample_ids.device != x.device:
        raise ValueError(f"sample_ids: expected ({x.shape[0]},) int64 on {x.device}, got {tuple(sample_ids.shape)} "
                         f"{sample_ids.dtype} on {sample_ids.device}")
    # Ids outside [0, 2^32) give NaN for their sample (CPU tensors: _library's kernel raises before this one).
    xc, ec, ids = x.contiguous(), eps.contiguous(), sample_ids.contiguous()
    gc = xc if guide is None else guide.contiguous()
    out = torch.empty_like(xc)
    batch = xc.shape[0]
    n = xc[0].numel() if batch else 0
    if batch and n:
        blocks_per_sample = triton.cdiv(n, 4 * BLOCK_Q)
        with _device_guard(x.device):
            _sde_step_philox_kernel[(batch * blocks_per_sample,)](
                xc, ec, gc, out, ids, n, blocks_per_sample, float(a), float(b), float(c),
                seed & _MASK32, seed >> 32, step & _MASK32, stream & _MASK32,
                COMPUTE=_compute_dtype(x.dtype), HAS_GUIDE=guide is not None, BLOCK_Q=BLOCK_Q,
                enable_fp_fusion=False,
            )
    return out


class _Triton:
    """The Triton implementation of the two step ops (module-level functions)."""

    sde_step_z = staticmethod(sde_step_z)
    sde_step_philox = staticmethod(sde_step_philox)

    def __repr__(self) -> str:
        return "diffpure_fast.ops.triton_sde"


def impl() -> _Triton | None:
    """The Triton implementation, or None when triton is not importable."""
    return _Triton() if HAS_TRITON else None

