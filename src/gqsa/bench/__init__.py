"""Measurement apart from the runtime: ``gqsa bench`` (:mod:`~gqsa.bench.runner`: timed generations of the
decode engine, kernel-time profile, tables) and random models of named architectures
(:mod:`~gqsa.bench.synthetic`, with the benchmark-only ``TinyGemmLinear``). Uses only the public API of
:mod:`gqsa.engine`."""
