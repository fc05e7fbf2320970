"""cifarlens.device.retain_freed_memory: CPU training reuses freed memory instead of having the
kernel fault in fresh pages for every big tensor of every step."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from cifarlens import api
from cifarlens.api import train
from conftest import make_cifar10
from test_budget import tiny_fastnet_cfg

# Allocates and frees tensors of 33-64 MiB (over glibc's mmap threshold, as a fastnet step at
# 32 px does), then prints whether malloc was set and the page faults of one more round.
CHURN = textwrap.dedent("""
    import resource, torch
    from cifarlens.device import retain_freed_memory
    kept = retain_freed_memory()
    def churn(rounds):
        for _ in range(rounds):
            tensors = [torch.empty(mib << 20, dtype=torch.uint8).fill_(1) for mib in (40, 48, 64, 33)]
            del tensors
    churn(20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn(5)
    print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def _churn(**env) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], float(out[1])


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.slow  # two processes, ~6 s; CI runs it with the slow set (the default suite's 7-minute budget)
@pytest.mark.skipif(not _glibc(), reason="sets glibc's malloc; elsewhere it does nothing")
def test_kept_memory_is_reused_without_page_faults_and_the_variable_turns_it_off():
    kept, faults = _churn()
    assert kept == "True" and faults < 1000  # 185 MiB a round: ~47,000 faults of 4 KiB pages when given back
    kept, faults = _churn(CIFARLENS_KEEP_MEMORY="0")
    assert kept == "False" and faults > 40_000  # malloc as glibc sets it: fresh pages every round


def test_training_on_the_cpu_keeps_freed_memory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(api, "retain_freed_memory", lambda: calls.append(1) or True)
    data = make_cifar10(tmp_path / "data", n_train_per_batch=8, n_test=8).data_dir
    train(tiny_fastnet_cfg(data, epochs=1), tmp_path / "run", report=False)
    assert calls == [1]


@pytest.mark.parametrize("name, message", [
    ("cpu:1", "the CPU has no numbered devices; use --device cpu"),  # it was accepted and recorded as cpu:1
    ("garbage", "unknown device 'garbage'"),
    ("mps", "unsupported device 'mps'"),
])
def test_a_device_this_machine_cannot_be_is_one_line(name, message):
    from cifarlens.device import resolve_device
    from cifarlens.errors import CifarlensError

    with pytest.raises(CifarlensError, match=message):
        resolve_device(name)
    assert resolve_device("cpu:0") == torch.device("cpu:0") and resolve_device("cpu").type == "cpu"


def test_a_gpu_that_is_not_there_is_named(monkeypatch):
    from cifarlens.device import resolve_device
    from cifarlens.errors import CifarlensError

    if not torch.cuda.is_available():
        with pytest.raises(CifarlensError, match="--device cuda:1 was asked for but CUDA is not available"):
            resolve_device("cuda:1")  # it said "--device cuda", not the device asked for
        return
    count = torch.cuda.device_count()
    with pytest.raises(CifarlensError, match=f"this machine has {count} GPU"):
        resolve_device(f"cuda:{count}")
