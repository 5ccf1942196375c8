"""The demos of fixedpoint, as a package so that tests and other demos import them as ``demos.<name>``.

Each entry script also runs as a file (``python demos/deq_cifar10.py``) from a checkout.
"""
