"""What a run was made with (environment.json): versions, machine, device, command, git revision."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from cifarlens.device import device_description

# the command of `train --nproc N` (JSON), which its ranks record: theirs lacks --nproc
LAUNCH_COMMAND = "CIFARLENS_NPROC_COMMAND"


def _command() -> list[str]:
    """This process's command line, or the launcher's for a rank ``train --nproc N`` started."""
    import json
    import os

    try:
        command = json.loads(os.environ.get(LAUNCH_COMMAND) or "null")
    except ValueError:
        command = None
    return command if isinstance(command, list) and "RANK" in os.environ else list(sys.argv)


def environment_record(device: torch.device, seed: int) -> dict:
    import numpy

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": _command(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": _package_version("torchvision"),  # not imported for this: that takes ~2 s
        "numpy": numpy.__version__,
        "cifarlens": _package_version("cifarlens"),
        "git_revision": _git_revision(),
        "device": str(device),
        "device_name": device_description(device),  # the GPU, or the CPU's model name and threads
        "cuda": torch.version.cuda,
        "seed": seed,
    }


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _git_revision() -> str | None:
    """The revision of the cifarlens source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
