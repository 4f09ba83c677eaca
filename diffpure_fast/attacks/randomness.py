"""Where every random number of an evaluation comes from: a pure function of (seed, purpose, indices).

The purifier's noise is a function of (seed, noise id, solver step, element) (``diffpure_fast.noise``); an attack
needs a fresh draw per (sample, attack step, EOT copy) and the evaluation one per (sample, evaluation). The encoding:

* the *seed* passed to the purifier is ``derive_seed(seed, purpose, restart, step)`` (a 63-bit hash), so each attack
  step and each evaluation draws noise from its own seed;
* the *noise id* of EOT copy ``j`` of the sample with global index ``i`` is ``i * eot + j`` (``i`` for evaluations),
  which must stay below 2^32: ``eot * n_samples <= 2^32``, e.g. 64 EOT copies for 67 million samples;
* fixed-noise mode (``attack_seed`` with a ``noise_seed``): every attack step uses that one seed, so with the same
  noise ids the attack optimises against one fixed set of ``eot`` draws per sample; the judge's seeds
  (``derive_seed(seed, 'eval', e)``) and the selection's stay fresh.

Nothing depends on the batch a sample sits in, the resume point or the number of processes.
"""

from __future__ import annotations

import hashlib

import torch

from .._validate import check_int

__all__ = ["MAX_NOISE_ID", "attack_seed", "derive_seed", "eot_noise_ids"]

MAX_NOISE_ID = 1 << 32


def derive_seed(seed: int, *parts) -> int:
    """A seed in [0, 2^63) from a base seed and a purpose path (strings and ints), by BLAKE2b: independent streams
    for distinct paths, the same stream for the same path on every machine."""
    seed = check_int("seed", seed, low=0)
    text = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def attack_seed(seed: int, noise_seed: int | None, *parts) -> int:
    """The purifier seed of one attack step: ``derive_seed(seed, *parts)``, fresh for every step (and run), or
    ``noise_seed`` itself for every step when it is given (fixed noise)."""
    return derive_seed(seed, *parts) if noise_seed is None else noise_seed


def eot_noise_ids(sample_ids: torch.Tensor, eot: int) -> torch.Tensor:
    """Noise ids (eot * B,) of the EOT copies laid out copy-major: position ``j * B + b`` is copy j of sample b,
    with id ``sample_ids[b] * eot + j``. sample_ids: (B,) int64 global sample indices >= 0."""
    ids = sample_ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or (int(ids.max()) + 1) * eot > MAX_NOISE_ID):
        raise ValueError(f"sample_ids: global index * eot must stay below 2^32 (noise ids), got max index "
                         f"{int(ids.max())} with eot={eot}")
    return (ids[None, :] * eot + torch.arange(eot, device=ids.device)[:, None]).reshape(-1)
