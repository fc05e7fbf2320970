"""Which device to run on, what it is, and how a CPU process holds its memory for training: the
lowest layer of the engine.

Both :mod:`cifarlens.distributed` (a torchrun rank picks its GPU) and :mod:`cifarlens.engine`
(precision, training) need to resolve ``--device``; it lives here, below both of them, so
neither imports the other to get it. ``cifarlens.engine`` re-exports these names.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform

import torch

from cifarlens.errors import CifarlensError

__all__ = ["available_memory", "check_batch_memory", "cpu_bf16_pays", "cpu_has_native_bf16", "device_description", "gpu_has_native_bf16", "resolve_device", "retain_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device that exists here (else a one-line error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CifarlensError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CifarlensError(f"--device {name} was asked for but CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise CifarlensError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type not in ("cpu", "cuda"):
        raise CifarlensError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):  # recorded as cpu:1, and nothing else changed
        raise CifarlensError(f"--device {name}: the CPU has no numbered devices; use --device cpu")
    return device


def device_description(device: torch.device) -> str:
    """The device in words, for benchmarks and run records: the GPU, or the CPU's model, instruction
    set and threads, e.g. ``AMD EPYC CPU (AVX512, native bf16), 2 threads``."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    # the instruction set PyTorch's kernels use, and whether bf16 is native (and used): what sets a
    # CPU's speed
    bf16 = ", native bf16" if cpu_bf16_pays() else ", native bf16 unused" if cpu_has_native_bf16() else ""
    isa = torch.backends.cpu.get_cpu_capability() + bf16
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


@functools.cache
def cpu_bf16_pays() -> bool:
    """Whether bf16 is faster than fp32 on this CPU, so that training uses it (``train.cpu_amp``'s
    default, Muon's Newton-Schulz iterations): native bf16 (:func:`cpu_has_native_bf16`) with AMX,
    or on an AMD CPU (AVX512-BF16, Zen 4 on). Intel's AVX512-BF16 alone is slower than fp32.

    Measured (docs/benchmarks.md): a 2-core AMD EPYC VM with AVX512-BF16 trained 1.6x faster in
    bf16 (2,928 against 1,780 images/s); an Intel Xeon VM with AMX multiplied bf16 matrices at
    420-490 GFLOP/s against fp32's 160; a 2-core Intel Xeon VM showing AVX512-BF16 but not AMX
    took 1.6x longer in bf16 for a fastnet step at 32 px (1,113-1,160 against 657-733 ms) and
    for Muon's step (80 against 51 ms), with oneDNN's native bf16 kernels.
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return cpu_has_native_bf16() and (bool(amx()) or not _intel())


def _intel() -> bool:
    """Whether the CPU is Intel's (/proc/cpuinfo's vendor_id on Linux, else the processor name)."""
    vendor = _cpuinfo("vendor_id")
    return vendor == "GenuineIntel" if vendor else "intel" in platform.processor().lower()


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo (Linux), else ''."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def gpu_has_native_bf16(device: torch.device) -> bool:
    """Whether this CUDA GPU computes bf16 in hardware (compute capability 8.0 on: A100, RTX 30xx,
    H100). ``torch.cuda.is_bf16_supported()`` also says yes on older GPUs (V100, T4), where bf16 is
    emulated and cuDNN has no bf16 convolutions; those train in fp16 with a grad scaler."""
    return torch.cuda.get_device_capability(device)[0] >= 8


@functools.cache
def retain_freed_memory() -> bool:
    """Have glibc's malloc keep the memory PyTorch frees on the CPU, to reuse it, rather than hand
    it back to the system; True where that was set (Linux with glibc), once per process.

    By default glibc serves each allocation over 32 MiB with a fresh ``mmap`` and unmaps it when
    freed, so every training step pays again for the kernel to fault in and zero those pages: a
    fastnet step at 32 px (batch 256) took 66,000-76,000 page faults and 160-210 ms of kernel CPU
    time on a 2-core Intel Xeon VM, almost none at 24 px, where the tensors are smaller. With mmap
    off and trimming held back, the same step after its first few takes at most a few thousand
    and a few ms (docs/benchmarks.md, *... and page faults (ninth session)*). The process then
    keeps about its peak memory, as PyTorch's CUDA caching allocator does on a GPU, or
    jemalloc / tcmalloc (which PyTorch's CPU launcher, ``torch.backends.xeon.run_cpu``, preloads
    for the same reason); a fastnet budget run peaked at 2,033 MiB against 1,891 MiB without it. (A
    loop that only allocates and frees one aligned 64 MiB block held ~950 MiB before glibc reused
    it; training's mix of sizes showed no such growth.) ``CIFARLENS_KEEP_MEMORY=0`` in the environment
    leaves malloc as it is.
    Training on a CPU calls it (cifarlens.api.train); it changes no result, only where memory comes from.
    """
    if os.environ.get("CIFARLENS_KEEP_MEMORY", "").strip() == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: another libc's mallopt may take other parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # no mmap for big blocks (they come from the heap, and go back to it), and free memory at the
    # heap's top is returned to the system only past 2 GiB (mallopt takes an int)
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def available_memory() -> int | None:
    """Bytes this process can still allocate on the CPU before the system's out-of-memory killer
    acts: the kernel's ``MemAvailable``, or less where a cgroup (a container) caps the memory; None
    where neither can be read (not Linux)."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                limits.append(int(cap) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


# activations autograd keeps per image, against the bytes of the image as float32: at most this (measured
# at 32 px: fastnet 135x, resnet20 124x, wrn28_10, the widest CIFAR network here, 1,500x)
MAX_ACTIVATION_RATIO = 10_000


def activation_bytes_per_image(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """Bytes that autograd keeps for the backward pass per training image of ``shape`` (C, H, W):
    the distinct tensors a forward pass saves for 2 images less those for 1 (the weights cancel
    out). In eval mode, so no BatchNorm statistic moves; train mode saves about as much."""
    def saved(n: int) -> int:
        seen: dict[tuple[int, int], int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            seen[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(torch.zeros((n, *shape), device=device))
        return sum(seen.values())

    was_training = model.training
    model.eval()
    try:
        return max(saved(2) - saved(1), 0)
    finally:
        model.train(was_training)


def check_batch_memory(model: torch.nn.Module, batch: int, shape: tuple[int, ...], device: torch.device) -> str | None:
    """Refuse a training batch whose activations alone would outgrow the memory left on the CPU,
    before the system's out-of-memory killer ends the process without a word (a batch of 54,000
    Fashion-MNIST images took 23 GiB and was killed); a warning when they would take over half of
    it. An estimate from below: a step needs more (Fashion-MNIST, fastnet_cpu, batch 10,000 on a
    2-core VM: activations 4.6 GiB, peak RSS 5.4 GiB with ``CIFARLENS_KEEP_MEMORY=0``, 7.5 GiB with
    freed memory kept for reuse by :func:`retain_freed_memory`, the default)."""
    free = available_memory() if device.type == "cpu" else None
    if free is None or 2 * batch * math.prod(shape) * 4 * MAX_ACTIVATION_RATIO <= free:
        return None  # not measured: it could not come near the warning (most runs; the measure costs a forward)
    per_image = activation_bytes_per_image(model, shape, device)
    gib, needed = 2**30, per_image * batch
    what = (f"a training batch of {batch:,} images needs at least {needed / gib:.1f} GiB of memory for its activations "
            f"({per_image / 2**20:.2f} MiB an image at {'x'.join(map(str, shape[1:]))} px)")
    if needed > free:
        raise CifarlensError(f"{what}, more than the {free / gib:.1f} GiB available: lower --batch-size "
                             f"(to at most {max(free // per_image, 1):,} here)")
    if 2 * needed > free:
        return f"{what}, over half of the {free / gib:.1f} GiB available: it may run out of memory (lower --batch-size)"
    return None


def out_of_memory_error(err: BaseException, device: torch.device, batch: int) -> CifarlensError | None:
    """The one-line error for a training step that ran out of memory (CUDA's OutOfMemoryError, the
    CPU allocator's "can't allocate memory", Python's MemoryError); None for any other error."""
    if not (isinstance(err, (torch.OutOfMemoryError, MemoryError))
            or isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        return None
    import re

    asked = re.search(r"ried to allocate ([\d.]+) ?(\w+)", str(err))  # CPU: "... 4503599627370496 bytes", CUDA: "20.00 MiB"
    size = "" if asked is None else f" (asking for {float(asked[1]) / 2**30:.1f} GiB more)" if asked[2] == "bytes" \
        else f" (asking for {asked[1]} {asked[2]} more)"
    return CifarlensError(f"out of memory on {device} while training with batch size {batch}{size}: "
                          "lower --batch-size")
