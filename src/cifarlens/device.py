"""Which device to run on, and what it is: the lowest layer of the engine.

Both :mod:`cifarlens.distributed` (a torchrun rank picks its GPU) and :mod:`cifarlens.engine`
(precision, training) need to resolve ``--device``; it lives here, below both of them, so
neither imports the other to get it. ``cifarlens.engine`` re-exports these names.
"""

from __future__ import annotations

import functools
import platform

import torch

from cifarlens.errors import CifarlensError

__all__ = ["cpu_has_native_bf16", "device_description", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device that exists here (else a one-line error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CifarlensError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CifarlensError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise CifarlensError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def device_description(device: torch.device) -> str:
    """The device in words, for benchmarks and run records: the GPU, or the CPU's model, instruction
    set and threads, e.g. ``AMD EPYC CPU (AVX512, native bf16), 2 threads``."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the instruction set PyTorch's kernels use, and whether bf16 is native: what sets a CPU's speed
    isa = torch.backends.cpu.get_cpu_capability() + (", native bf16" if cpu_has_native_bf16() else "")
    threads = torch.get_num_threads()
    return f"{cpu} CPU ({isa}), {threads} thread{'s' * (threads != 1)}"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), so that bf16 autocast
    speeds training up; without them oneDNN emulates bf16 and it is slower than fp32.

    False too when PyTorch's kernels are held below AVX512 (``ATEN_CPU_CAPABILITY=avx2``, as
    with ``ONEDNN_MAX_CPU_ISA=AVX2`` to time an AVX2-only machine on a newer one): the process
    then runs as that machine would, in fp32. Asked once per process (the answer cannot change).
    """
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
