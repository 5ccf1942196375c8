"""Tooling shared by ``demos/`` and ``benchmarks/``: timing, machine description, result files.

Not part of the ``fixedpoint`` library (which holds the solvers only) and not installed with it:
importable from the root of a checkout of the repository, by the demos and benchmarks run as modules from there
(``python -m demos.deq_cifar10``, ``python -m benchmarks.bench_solvers``) and by the tests.
"""
