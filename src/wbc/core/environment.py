"""What a run ran on: library versions, CPU / GPU and the kernel-dispatch settings that change its numbers.

Written as `env.json` next to each fold's metrics. Seeds repeat a CPU run bit for bit only on the same kernels:
torch picks them by the CPU's instruction set (`ATEN_CPU_CAPABILITY`, oneDNN's `ONEDNN_MAX_CPU_ISA`), so the
same code, data and seed give other losses on another CPU (docs/RESULTS.md measures it). `differences` names
what changed between two records, so a resumed or rerun fold can say why it no longer matches.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from .config import ROOT

# packages whose version changes decoded pixels, augmentations or arithmetic
PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "opencv-python-headless", "albumentations",
            "albucore", "scipy", "scikit-learn", "pandas")
# environment variables that change which kernels run, or how many threads split the work
KERNEL_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")
# the keys whose change alone can move a seeded run's numbers
NUMERIC_KEYS = ("cpu", "cpu_capability", "torch_threads", "cuda_device", "deterministic", "packages", "kernel_env")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """Model name plus family / model numbers: 'AMD EPYC' alone does not tell Zen 4 from Zen 5."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """A JSON-ready record of the running environment."""
    cuda = torch.cuda.is_available()
    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "packages": {p: _version(p) for p in PACKAGES},
        "kernel_env": {v: os.environ[v] for v in KERNEL_VARS if v in os.environ},
    }


@contextlib.contextmanager
def kernel_mode(deterministic: bool):
    """`train.deterministic`: kernels that repeat on a GPU (slower), or cuDNN autotuning (faster, as timm trains).

    Ops with no deterministic CUDA kernel warn instead of failing (warn_only), so a warning in the log means
    that run still does not repeat exactly. CPU kernels are deterministic either way. Restores the global
    flags on exit.
    """
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at its first call
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each numerics-relevant setting that differs (package by package)."""
    out = []
    for key in NUMERIC_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a} -> {b}")
    return out
