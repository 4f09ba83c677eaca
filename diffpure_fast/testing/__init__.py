"""References and small models for tests and benchmarks; ``torchsde_reference`` needs torchsde (a dev dependency),
so nothing outside the tests and benchmarks imports this package."""
