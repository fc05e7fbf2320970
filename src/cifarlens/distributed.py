"""Data-parallel training under ``torchrun``: who am I, the process group, and reductions.

``torchrun --nproc_per_node=N -m cifarlens.cli train ...`` (or ``cifarlens train --nproc N``)
starts N processes with RANK / WORLD_SIZE / LOCAL_RANK in their environment. Every process
reads the whole dataset and takes its shard of each global batch (see
``cifarlens.data.loader.TensorLoader``), DistributedDataParallel averages the gradients,
and metrics are summed over ranks with :func:`all_reduce_sum`. Only rank 0 writes files.

Without those variables (a plain ``cifarlens train``, the tests, the tuner) everything here
is a no-op for a single process, so the engine has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cifarlens.device import resolve_device
from cifarlens.errors import CifarlensError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = World()


def world_from_env() -> World:
    """The world torchrun describes in the environment (a single process when it does not)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise CifarlensError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (they are set by torchrun)") from None
    return World(rank, world_size, local_rank)


def current_world() -> World:
    """The initialised process group's world, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def init(device_name: str) -> tuple[World, torch.device, bool]:
    """Join torchrun's process group if there is one; returns (world, device, whether we started it).

    CUDA ranks use NCCL and GPU ``LOCAL_RANK`` of their node; CPU ranks use gloo.
    """
    world = world_from_env()
    device = resolve_device(device_name)
    if not world.distributed:
        return world, device, False
    if not dist.is_available():
        raise CifarlensError("this torch build has no torch.distributed; train with one process")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise CifarlensError(
                f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} GPUs here; "
                "use --nproc_per_node <= the number of GPUs"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return current_world(), device, False
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # WORLD_SIZE left in the shell, not torchrun: init_process_group's ValueError, as a traceback
        raise CifarlensError(f"WORLD_SIZE={world.world_size} is set but {' and '.join(missing)} not: this is not a "
                             "torchrun process; unset WORLD_SIZE and RANK, or train on several processes with --nproc")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current_world(), device, True


def shutdown(started: bool) -> None:
    if started and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(*values: torch.Tensor | float) -> list[float]:
    """Sums over all ranks (one collective for all values); the values themselves for one process."""
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL only reduces CUDA tensors; gloo takes CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flat = flat.to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.tolist()


def gather_slices(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's ``values`` (rank r holds ``sizes[r]`` of them, 1-D) concatenated in rank order,
    on every rank; ``values`` itself for one process. Padded to the largest size for the collective
    (a last global batch splits unevenly), which needs no host read."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    width = max(sizes)
    padded = torch.zeros(width, dtype=values.dtype, device=device)
    padded[: len(values)] = values.to(device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)]).to(values.device)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank; nothing for one process. Each rank's
    last training step updated its own (DDP sends rank 0's at the start of each forward pass), and
    an EMA of the weights averages them per rank, so validation on rank 1 used statistics that no
    saved model holds, and a resumed run (rank 0's EMA everywhere) validated otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def rank0_failed(what: str) -> CifarlensError:
    """The error of the ranks other than 0 when rank 0 failed at ``what`` and said why itself (the
    ``--nproc`` launcher prints rank 0's message, not these: see :data:`RANK0_FAILED`)."""
    return CifarlensError(f"rank 0 could not {what} {RANK0_FAILED}")


RANK0_FAILED = "(see its message)"  # how :func:`rank0_failed`'s messages end


def on_rank0(world: "World", fn, what: str):
    """``fn()`` on rank 0 alone, its result there (None elsewhere); a :class:`CifarlensError` it
    raises stops every rank, the others with "rank 0 could not WHAT", not rank 0 alone (the
    others would wait in their next collective until torchrun ended them)."""
    result, failed = None, None
    if world.is_main:
        try:
            result = fn()
        except CifarlensError as err:
            failed = err
    if all_reduce_sum(failed is not None)[0]:
        raise failed or rank0_failed(what)
    return result


def first_divergence(bad_step: torch.Tensor, bad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (step, loss) of the first rank whose training loss diverged (step -1: none), as every
    rank sees it, so that all ranks stop together: a rank that stopped alone would leave the others
    waiting in their next collective until torchrun ends them, and rank 0 would then record the
    run as interrupted rather than diverged. The values themselves for one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bad_step, bad_loss
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    pair = torch.stack([bad_step.to(device, torch.float64), bad_loss.to(device, torch.float64)])
    gathered = [torch.empty_like(pair) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, pair)
    for step, loss in gathered:  # rank order; a host read, as the check that follows makes anyway
        if step >= 0:
            return step.long(), loss
    return bad_step, bad_loss


class PeerLost(CifarlensError):
    """A collective failed because another rank is gone: killed, or out of memory. The run stops
    as an interrupted one does (resumable from its last checkpoint)."""


# what gloo and NCCL say when the other end of a collective has gone
_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_peer(err: BaseException, world: "World") -> PeerLost | None:
    """A :class:`PeerLost` for ``err`` when it is a collective's failure of that kind, else None
    (rank 0 printed gloo's 30-line traceback when rank 1 was killed)."""
    if not world.distributed or not isinstance(err, RuntimeError) or not any(s in str(err) for s in _GONE):
        return None
    return PeerLost("a training process was lost (killed, or out of memory?), and the run stopped with it")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_batch_size(batch_size: int, world: World) -> int:
    """Per-rank batch: ``train.batch_size`` is the global batch, so recipes keep their meaning."""
    if batch_size % world.world_size:
        raise CifarlensError(
            f"train.batch_size {batch_size} is the global batch and must be divisible by the "
            f"{world.world_size} processes"
        )
    return batch_size // world.world_size
