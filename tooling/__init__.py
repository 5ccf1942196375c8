"""Tooling shared by ``demos/`` and ``benchmarks/``: timing, machine description, result files.

Not part of the ``fixedpoint`` library (which holds the solvers only) and not installed with it:
importable from a checkout of the repository, by the demos and benchmarks run as scripts
(``python demos/deq_cifar10.py``) or as modules (``python -m demos.deq_cifar10``), and by the tests.
"""
