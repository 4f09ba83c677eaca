"""diffpure_fast: diffusion-based adversarial purification (DiffPure) with fused kernels and exact gradients."""

__version__ = "0.1.0"
