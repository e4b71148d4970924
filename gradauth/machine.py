"""The machine a benchmark ran on (CPUs, torch threads and version, Python, GPU): recorded beside every bench result."""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's name (/proc/cpuinfo's "model name"; platform's answer elsewhere): this project's machines change
    CPU between sessions, and a benchmark's figures are only comparable on the same one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
