"""Shared helpers of the core benchmarks (train_speed, inference): the machine line, test frames,
timing with device synchronisation, and Markdown tables."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mafr_ros.machine import cpu_model, load_average  # noqa: E402


def machine_info() -> dict:
    import torch

    model = cpu_model()
    gpu = "-"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB), CUDA {torch.version.cuda}"
    load = load_average()
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "load_average": load, "torch": torch.__version__,
            "python": platform.python_version()}


def machine_line(info: dict | None = None) -> str:
    info = info or machine_info()
    return (f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}); "
            f"GPU: {info['gpu']}; load average {info['load_average']}; torch {info['torch']}, "
            f"Python {info['python']}")


def synthetic_frames(count: int, size: int = 256, category: str = "gland", seed: int = 0):
    """(rgb, xyz) frames of seeded synthetic good parts (the same generator as `mafr synth`)."""
    from mafr_ros.data.synthetic import render_sample

    return [render_sample(category, "good", seed + i, size)[:2] for i in range(count)]


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def timed(fn, device=None):
    """(result, seconds) of fn(), with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20
