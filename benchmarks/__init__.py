"""The benchmarks of fixedpoint (scripts; a package so that tests import them as ``benchmarks.<name>``)."""
