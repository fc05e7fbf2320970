"""``cifarlens train --nproc N``: the same command on N local processes under torchrun.

The launcher checks what it can before starting the ranks (the run folder, the batch, settings
a single process must have), then runs torchrun in this process and waits. Its ranks speak
through it: a rank's one-line error goes to a file the launcher reads, so a user mistake that
every rank meets is printed once, not once a rank and interleaved with torchrun's log; a rank
whose launcher dies, even by SIGKILL, is stopped as Ctrl-C stops it (Linux), instead of training
on unseen and holding the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from cifarlens.config_flags import config_from_args
from cifarlens.distributed import RANK0_FAILED
from cifarlens.environment import LAUNCH_COMMAND
from cifarlens.errors import CifarlensError

LAUNCHED = "CIFARLENS_NPROC_LAUNCHER"  # the launcher's process id, for the ranks `train --nproc N` starts
ERRORS_DIR = "CIFARLENS_NPROC_ERRORS"  # where those ranks leave their one-line errors for it


def resume_hint(out, nproc: int | None = None) -> str:
    """What an interrupted ``train`` can do next, from what its run folder holds (``nproc``: the
    launcher's --nproc; under torchrun, the ranks' number)."""
    from cifarlens.runs import RunDir

    if not isinstance(out, str):
        return ""
    run = RunDir(out)
    finished = run.is_run() and run.meta().get("status") == "finished"
    if finished:  # stopped in its report, after the evaluation
        return f"; the run has finished and is evaluated: `cifarlens report {out}` writes its report"
    if run.last_checkpoint.is_file():
        world = nproc or int(os.environ.get("WORLD_SIZE", "1") or 1)  # resume on as many processes
        return f"; continue with: cifarlens train --resume {out}" + (f" --nproc {world}" if world > 1 else "")
    if (run.path / "run.json").is_file():
        return f"; no epoch had finished: start it again with --force (--out {out})"
    return "; nothing was written"


def is_launched_rank() -> bool:
    """Whether this process is a rank that ``train --nproc N`` started."""
    return bool(os.environ.get(LAUNCHED)) and "RANK" in os.environ


def leave_error(message: str) -> bool:
    """A launched rank's one-line error, left for the launcher to print once; False (print it
    yourself) in any other process, or when the file cannot be written."""
    folder = os.environ.get(ERRORS_DIR)
    if not folder or not is_launched_rank():
        return False
    try:
        (Path(folder) / f"rank{int(os.environ['RANK'])}.txt").write_text(message, encoding="utf-8")
    except (OSError, ValueError):
        return False
    return True


def die_with_launcher() -> None:
    """Have the kernel send this launched rank SIGTERM when its launcher dies (prctl's
    PR_SET_PDEATHSIG; Linux only, elsewhere nothing): it then stops as Ctrl-C stops it, its run
    resumable. A launcher killed by SIGKILL left both ranks training, the run folder locked."""
    launcher = os.environ.get(LAUNCHED, "")
    if not is_launched_rank() or not sys.platform.startswith("linux") or not launcher.isdigit():
        return
    import ctypes

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _ranks_message(folder: Path) -> str | None:
    """The error to print for ranks that failed: rank 0's own, else the first rank's that is not
    only "rank 0 could not ... (see its message)"; None when no rank left one (a crash, a kill)."""
    messages = {}
    for path in folder.glob("rank*.txt"):
        try:
            messages[int(path.stem[4:])] = path.read_text(encoding="utf-8")
        except (OSError, ValueError):
            continue
    own = sorted(rank for rank, text in messages.items() if not text.endswith(RANK0_FAILED))
    if not own:
        return None
    return messages[own[0]] if own[0] == 0 else f"rank {own[0]}: {messages[own[0]]}"


def _failure_message(failures: dict) -> str:
    """"a training process failed (exit code 1); its message is above", or, for a rank a signal
    ended (out of memory, kill), which signal."""
    codes = sorted({f.exitcode for f in failures.values()})
    killed = [c for c in codes if c < 0]
    if killed:
        names = ", ".join(signal.Signals(-c).name if -c in set(signal.Signals) else f"signal {-c}" for c in killed)
        return f"a training process was ended by {names} (killed, or out of memory?)"
    return f"a training process failed (exit code {', '.join(map(str, codes))}); its message is above"


def launch_torchrun(args) -> int:
    """``--nproc N``: run this same command under torchrun on N local processes, and wait."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if args.nproc < 1:
        raise CifarlensError(f"--nproc must be >= 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ:
        raise CifarlensError("--nproc starts torchrun itself; under torchrun, drop --nproc")
    from cifarlens.runs import RunDir

    out = args.resume if isinstance(args.resume, str) else args.out
    if args.resume:  # the mistakes every rank would make, caught before starting them (each rank printed its own)
        from cifarlens.resume import resumed_config

        with RunDir(out).claimed():  # a run another train is training: refused here (rank 0 said it in 4 lines)
            resumed_config(RunDir(out), "cpu", None, None, lock=False)
    else:
        RunDir(args.out).check_new(force=args.force)
        from cifarlens.distributed import World, check_batch_size
        from cifarlens.engine import resolve_device
        from cifarlens.recipes import resolve_train

        tc = resolve_train(config_from_args(args).train)
        if tc.time_budget:
            raise CifarlensError("train.time_budget times single-process steps: drop --nproc, or give --epochs instead")
        check_batch_size(tc.batch_size, World(0, args.nproc))
        if tc.sync_bn and resolve_device(tc.device).type != "cuda":
            raise CifarlensError("train.sync_bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only")
    argv, skip = [], False
    for arg in args.argv:  # the same flags without --nproc, with the run folder fixed for every rank
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    if not args.resume and "--out" not in argv and not any(a.startswith("--out=") for a in argv):
        argv += ["--out", args.out]
    # torchrun would pin every process to 1 thread; share the cores between them instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    launch = ["--standalone", f"--nproc_per_node={args.nproc}", "-m", "cifarlens.cli", *argv]
    print("cifarlens: torchrun " + " ".join(launch), file=sys.stderr, flush=True)
    errors = Path(tempfile.mkdtemp(prefix="cifarlens-nproc-"))
    # the ranks leave the "interrupted; continue with ..." line, and their errors, to this process
    os.environ[LAUNCHED], os.environ[ERRORS_DIR] = str(os.getpid()), str(errors)
    os.environ[LAUNCH_COMMAND] = json.dumps(sys.argv)  # what environment.json records: the command as given
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # its "failed (exitcode: 2)" lines: said below, in one
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as err:
        message = _ranks_message(errors) or _failure_message(err.failures)
        if RunDir(out).is_run() and RunDir(out).meta().get("status") == "interrupted":
            message += resume_hint(out, nproc=args.nproc)
        raise CifarlensError(message) from None
    except SignalException as err:  # torchrun stopped the ranks; their last checkpoint stands
        hint = resume_hint(out, nproc=args.nproc)
        print(f"cifarlens: stopped by signal {err.sigval.name}{hint}", file=sys.stderr)  # (before any epoch: --force)
        return 128 + int(err.sigval)  # as a shell reports a process a signal ended: 143 for SIGTERM
    finally:
        elastic.setLevel(level)
        os.environ.pop(LAUNCHED, None)
        os.environ.pop(ERRORS_DIR, None)
        os.environ.pop(LAUNCH_COMMAND, None)
        shutil.rmtree(errors, ignore_errors=True)
    return 0
