"""Peak memory of one local training round: GPU (torch + NVML) where there is one, RSS otherwise.

FlowerTune never measures memory; operators need it to size silos. Peaks are reset at the start of
every round so each figure belongs to that round only.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class MemoryPeaks:
    peak_gpu_allocated_bytes: int = 0
    peak_gpu_reserved_bytes: int = 0
    nvml_used_bytes: int = 0
    gpu_total_bytes: int = 0
    peak_rss_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _reset_rss_peak() -> None:
    # Writing "5" to clear_refs resets VmHWM (Linux >= 4.0), so the next read is this round's peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _read_rss_peak() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nvml_used(device_index: int) -> tuple[int, int]:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        info = pynvml.nvmlDeviceGetMemoryInfo(h)
        return int(info.used), int(info.total)
    except Exception:
        return 0, 0


class MemoryMeter:
    """Use as ``meter.start()`` before the round and ``meter.stop()`` after it."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        _reset_rss_peak()

    def stop(self) -> MemoryPeaks:
        import torch

        peaks = MemoryPeaks(peak_rss_bytes=_read_rss_peak())
        if self.cuda:
            torch.cuda.synchronize()
            peaks.peak_gpu_allocated_bytes = int(torch.cuda.max_memory_allocated())
            peaks.peak_gpu_reserved_bytes = int(torch.cuda.max_memory_reserved())
            peaks.nvml_used_bytes, peaks.gpu_total_bytes = _nvml_used(torch.cuda.current_device())
            if not peaks.gpu_total_bytes:
                peaks.gpu_total_bytes = int(torch.cuda.get_device_properties(0).total_memory)
        return peaks
