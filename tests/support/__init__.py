"""Test helpers that are not fixtures (fixtures live in tests/conftest.py)."""
