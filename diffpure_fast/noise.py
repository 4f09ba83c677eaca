"""Counter-based Gaussian noise: a pure function of (seed, sample id, step, stream, element index).

Noise is regenerated, never stored: the forward pass, the adjoint's reverse sweep and any recompute ask for the
same counter and get the same numbers, and a sample's noise does not depend on the batch it sits in.

Specification (shared by this reference and the C++, CUDA and Triton kernels). Float32 noise is bit-identical
between this reference and the C++ kernel; float64 noise agrees to within 1e-14 (torch's vectorised float64
log/sin/cos and libm's differ in the last bit for ~1% of values, neither more accurate), CUDA and Triton within
1e-6:

* Generator: Philox4x32-10 (Salmon et al., SC'11; the Random123 constants), key ``(seed mod 2^32, seed >> 32)``
  for a seed in [0, 2^63) (a torch.library ``int`` is a signed 64-bit integer).
* Counter for the element ``e`` (flat index inside one sample, ``e < 2^34``) of sample ``i`` at solver step ``k``
  in stream ``s``: ``(e >> 2, i, k, s)``; one Philox call yields the four words ``w0..w3`` shared by the four
  elements ``4q .. 4q + 3``.
* Box-Muller in float64 on the word pairs ``(w0, w1)`` and ``(w2, w3)``:
  ``u = (w_even + 1) / 2^32`` in (0, 1], ``v = w_odd / 2^32`` in [0, 1), ``r = sqrt(-2 ln u)``;
  lane 0 is ``r cos(2 pi v)``, lane 1 ``r sin(2 pi v)`` (likewise lanes 2 and 3 from the second pair).
  The float64 value is rounded once to the output dtype.
"""

from __future__ import annotations

import math

import torch

from ._validate import check_int

__all__ = [
    "MAX_ELEMENTS_PER_SAMPLE",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "STREAM_FORWARD",
    "STREAM_REVERSE",
    "check_seed",
    "gaussian",
    "philox4x32",
    "sample_noise",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF

# Streams keep the forward diffusion's z apart from the reverse solver's increments (same seed, same sample).
STREAM_FORWARD = 0
STREAM_REVERSE = 1

MAX_ELEMENTS_PER_SAMPLE = 1 << 34


def check_seed(seed) -> int:
    """``seed`` as an int in [0, 2^63) (a Python or NumPy integer; the package's one integer rule)."""
    return check_int("seed", seed, low=0, high=(1 << 63) - 1)


def _mulhilo32(m: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product m * b, b holding uint32 values in int64.

    int64 cannot hold a 32x32-bit product, so b is split in 16-bit halves (each partial product < 2^48)."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = m * b_lo
    p_hi = m * b_hi
    s = ((p_hi & 0xFFFF) << 16) + p_lo
    return (p_hi >> 16) + (s >> 32), s & _MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words (int64, broadcast)."""
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def gaussian(seed: int, sample_ids: torch.Tensor, step: int, stream: int, numel: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of shape (len(sample_ids), numel), per the module's specification.

    sample_ids: (B,) integer tensor in [0, 2^32) (a sample with an id outside gets NaN); its device is the
    output's device.
    """
    check_seed(seed)
    if numel > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"numel: at most 2^34 elements per sample, got {numel}")
    device = sample_ids.device
    n_quads = (numel + 3) // 4
    q = torch.arange(n_quads, device=device, dtype=torch.int64)
    ids = sample_ids.to(torch.int64).reshape(-1, 1)
    # Counter words broadcast to (B, n_quads).
    c0 = q.reshape(1, -1)
    c1 = ids
    # Python ints, not device tensors: a host-to-device copy per call would block CUDA graph capture
    # (diffpure_fast.cuda_graphs); the Philox rounds mix them with the tensor words exactly (products < 2^49).
    c2 = step & _MASK32
    c3 = stream & _MASK32
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    w0, w1, w2, w3 = (torch.broadcast_to(w, (ids.shape[0], n_quads)) for w in (w0, w1, w2, w3))
    two_pi = 2.0 * math.pi
    inv = 1.0 / 4294967296.0
    out = []
    for we, wo in ((w0, w1), (w2, w3)):
        u = (we.to(torch.float64) + 1.0) * inv
        v = wo.to(torch.float64) * inv
        r = torch.sqrt(-2.0 * torch.log(u))
        out += [r * torch.cos(two_pi * v), r * torch.sin(two_pi * v)]
    z = torch.stack(out, dim=-1).reshape(ids.shape[0], 4 * n_quads)[:, :numel]
    # An id outside [0, 2^32) gives NaN for its sample, as in the CUDA and Triton kernels (checking its range here
    # would synchronise a GPU; callers that can afford it raise instead).
    z = torch.where((ids < 0) | (ids > _MASK32), torch.nan, z)
    return z.to(dtype)


def sample_noise(seed: int, sample_ids: torch.Tensor, step: int, stream: int, like: torch.Tensor) -> torch.Tensor:
    """Noise shaped like ``like`` (B, ...), on its device and in its dtype."""
    b = like.shape[0]
    z = gaussian(seed, sample_ids.to(like.device), step, stream, like[0].numel() if b else 0, like.dtype)
    return z.reshape(like.shape)
