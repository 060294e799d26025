"""Test helpers that are not fixtures (fixtures live in tests/conftest.py): tiny models, scripted
grids, real-process federations, fault injection, the network-namespace lab. Every helper lives here,
and this package is the only part of tests/ that benchmarks/ imports."""
