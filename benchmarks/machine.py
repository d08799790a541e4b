"""The machine a benchmark ran on, named in every table it prints."""
import os
import platform

import torch


def machine() -> str:
    """'<CPU model>, <n> cores, torch <version>' (the model from /proc/cpuinfo, else the architecture)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
