"""The machine a number was measured on: every benchmark, experiment script and report names it."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo ("AMD EPYC", ...), else what platform says."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_name() -> str:
    """The first CUDA device's name, or '-' without one (torch imported only here)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"


def load_average() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "?"
