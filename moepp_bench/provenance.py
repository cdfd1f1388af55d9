"""Where a result came from: command line, git revision, versions, machine, threads, allocator, time."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "PYTORCH_CUDA_ALLOC_CONF")


def git_revision() -> str:
    """The checkout's revision (with -dirty when there are uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def provenance(*, device: str = "cpu", dtype: str | None = None, seed: int | None = None,
               threads: int | None = None, extra: dict | None = None) -> dict:
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_revision": git_revision(),
        "moepp_version": _moepp_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "dtype": dtype,
        "seed": seed,
        "allocator": {k: os.environ[k] for k in ALLOCATOR_VARS if k in os.environ} | _mallopt_state(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        record["cuda"] = torch.version.cuda
    if extra:
        record.update(extra)
    return record


def _moepp_version() -> str:
    from moepp import __version__

    return __version__


def _mallopt_state() -> dict:
    from .allocator import applied_settings

    return applied_settings()
