"""References and small models for tests and benchmarks (torchsde is imported lazily: a dev dependency)."""
