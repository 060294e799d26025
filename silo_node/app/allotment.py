"""The CPU threads and GPUs a silo may use, and how a worker process applies them.

Three silos on a 2-core machine that each let torch take 2 threads ran at 55 tokens/s together;
with one thread each, 270. torch sizes its pool from the machine's core count, not from what this
process may use, so the silo sets it from its allotment: ``--threads`` / ``--gpus``, else the CPU
affinity mask or the cgroup quota, and the visible devices.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "SILOTUNE_THREADS"  # read by the ClientApp process (either executor)
GPUS_ENV = "SILOTUNE_GPUS"  # the allotted device list as given ("" = none, "all" = visible ones)


@dataclass(frozen=True)
class Allotment:
    threads: int
    gpus: str  # comma-separated device indices; "" = CPU only

    def gpu_count(self) -> int:
        return len([g for g in self.gpus.split(",") if g.strip()])

    def env(self) -> dict[str, str]:
        """Environment for the processes that train: torch reads the threads, CUDA the devices."""
        out = {
            THREADS_ENV: str(self.threads),
            GPUS_ENV: self.gpus,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
        }
        if self.gpus:
            out["CUDA_VISIBLE_DEVICES"] = self.gpus
        return out


def cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole CPUs of the cgroup v2 quota (``quota period``), rounded up; None when unlimited."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, quota) if quota else cpus)


def visible_gpus() -> str:
    """The devices this process may see: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return ",".join(d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1")
    try:
        import torch

        return ",".join(str(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - no torch or no driver: CPU only
        return ""


def resolve(threads: int | None, gpus: str | None) -> Allotment:
    """The allotment from the operator's options; defaults from this machine's limits."""
    if threads is not None and threads < 1:
        raise ValueError("--threads must be at least 1")
    return Allotment(
        threads=threads or available_cpus(),
        gpus=visible_gpus() if gpus is None else ",".join(g.strip() for g in gpus.split(",") if g.strip()),
    )


def apply_threads_from_env() -> int:
    """In a process that trains: set torch's thread pool from the allotment; returns the count."""
    raw = os.environ.get(THREADS_ENV, "")
    if not raw.isdigit() or int(raw) < 1:
        return 0
    import torch

    n = int(raw)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def allotted() -> tuple[int, int]:
    """(threads, gpus) this process was given, for the round's metrics (0 threads = not set)."""
    raw = os.environ.get(THREADS_ENV, "")
    threads = int(raw) if raw.isdigit() else 0
    gpus = os.environ.get(GPUS_ENV, "")
    return threads, len([g for g in gpus.split(",") if g.strip()])
