"""Torch devices: the one place ``auto``/``cpu``/``cuda`` is resolved, waited for (timings) and named in records and reports."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but no CUDA GPU is available to torch here: use --device cpu (or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo``; elsewhere the platform's processor or machine name)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The hardware behind ``device``, for records and reports: the GPU's name for CUDA, else the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA GPU runs it asynchronously), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_record(device: torch.device) -> str:
    """The device as a model's training record names it: ``cuda (<the GPU>)``, or ``cpu (<n> threads)``."""
    if device.type == "cuda":
        return f"cuda ({device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
