"""What the tests and the benchmarks share: real gateways to drive, and simulations on a fake clock.

Not part of the product (not installed with it): `tests/` and `benchmarks/` import it, `gateway/`
never does (tests/test_layers.py checks both directions).
"""
