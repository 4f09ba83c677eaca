"""References and small models for tests and benchmarks; ``torchsde_reference`` and ``torchdiffeq_reference`` need
torchsde and torchdiffeq (dev dependencies), so nothing outside the tests and benchmarks imports this package."""
