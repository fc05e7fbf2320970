"""Continuing a stopped run (``train --resume``): its config as it started, its checkpoint."""

from __future__ import annotations

from cifarlens.checkpoint import load_checkpoint, load_state_into
from cifarlens.config import RunConfig, to_dict
from cifarlens.engine import FitState, Precision
from cifarlens.errors import CifarlensError
from cifarlens.models import unwrap_model
from cifarlens.runs import RunDir


FREE_ON_RESUME = ("train.device", "data.data_dir", "data.download")


def edited_keys(saved: dict, now: dict) -> list[str]:
    """"train.lr: 0.8 -> 0.05" for each setting of the checkpoint's config that config.yaml now
    gives otherwise (where the data is, whether it may be downloaded, and the device may change on
    resume: none of them changes what is trained)."""
    out = []
    for section, values in saved.items():
        current = now.get(section)
        if isinstance(values, dict) and isinstance(current, dict):
            out += [f"{section}.{key}: {value} -> {current[key]}" for key, value in values.items()
                    if key in current and current[key] != value and f"{section}.{key}" not in FREE_ON_RESUME]
    return out


def restore(run: RunDir, cfg: RunConfig, model, optimizer, scheduler, precision: Precision, device, ema
             ) -> FitState:
    ckpt = load_checkpoint(run.last_checkpoint, map_location=device)
    edited = edited_keys(ckpt.get("config") or {}, to_dict(cfg))
    if edited:
        raise CifarlensError(f"config.yaml of {run.path} was changed after the run started ({'; '.join(edited)}); "
                             "a resumed run goes on with the config it started with: undo the change, or train a "
                             "new run (another --out, or --force)")
    try:
        load_state_into(unwrap_model(model), ckpt["model"], run.last_checkpoint)
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if precision.scaler.is_enabled() and ckpt["scaler"]:  # {} from a run without fp16 (CPU, bf16 GPU)
            precision.scaler.load_state_dict(ckpt["scaler"])
        return FitState(**ckpt["state"])
    except (KeyError, TypeError, ValueError) as err:
        raise CifarlensError(f"{run.last_checkpoint} is incomplete ({err}); start the run again with --force") from None


def world_size_note(run: RunDir, world_size: int) -> str | None:
    """A warning when a run goes on with another number of processes than it started with
    (environment.json's ``world_size``): the global batch stays, but BatchNorm statistics and the
    data order per process differ from an uninterrupted run. None when they match or are unknown."""
    import json

    try:
        started = json.loads((run.path / "environment.json").read_text()).get("world_size", 1)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(started, int) or started == world_size:
        return None
    how = f"--nproc {started}" if started > 1 else "without --nproc"
    return (f"{run.path} trained on {started} process(es) and goes on with {world_size}: the global batch is the same, "
            f"but the result will differ from an uninterrupted run (resume with {how} to match it)")
