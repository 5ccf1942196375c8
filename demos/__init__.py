"""The demos of fixedpoint, as a package so that tests and other demos import them as ``demos.<name>``.

Each entry script runs as a module from the repository root (``python -m demos.deq_cifar10``; under torchrun,
``torchrun --standalone --nproc_per_node=2 -m demos.deq_cifar10``), not as a file.
"""
