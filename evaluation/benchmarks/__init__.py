"""The four FlowerTune suites, each a tuple of benchmarks in leaderboard column order."""

from __future__ import annotations

from evaluation.benchmarks import code, finance, general, medical
from evaluation.benchmarks.base import Benchmark, DataSource

SUITES: dict[str, tuple[Benchmark, ...]] = {
    "general": general.BENCHMARKS,
    "finance": finance.BENCHMARKS,
    "medical": medical.BENCHMARKS,
    "code": code.BENCHMARKS,
}


def get_benchmark(name: str) -> Benchmark:
    for benches in SUITES.values():
        for b in benches:
            if b.name == name:
                return b
    known = ", ".join(b.name for bs in SUITES.values() for b in bs)
    raise KeyError(f"unknown benchmark {name!r}; known: {known}")


__all__ = ["SUITES", "Benchmark", "DataSource", "get_benchmark"]
