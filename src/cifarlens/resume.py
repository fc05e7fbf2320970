"""Continuing a stopped run (``train --resume``): its config as it started, its checkpoint."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from cifarlens.checkpoint import load_checkpoint, load_state_into
from cifarlens.config import RunConfig, to_dict
from cifarlens.data.fingerprint import SIGNATURES_FILE
from cifarlens.data.pipeline import DataBundle
from cifarlens.engine import FitState, Precision
from cifarlens.errors import CifarlensError
from cifarlens.io import atomic_write_json
from cifarlens.inference import check_same_data
from cifarlens.models import unwrap_model
from cifarlens.runfiles import remove_temporaries
from cifarlens.runs import RunDir


FREE_ON_RESUME = ("train.device", "data.data_dir", "data.download")


def resumed_config(run: RunDir, device: str, report: bool | None, data_dir: str | None, *, lock: bool
                   ) -> tuple[RunConfig, bool | None]:
    """The config a stopped run goes on with (its own, on ``device``, its data perhaps moved to
    ``data_dir``) and whether it ends with a report (None: as it was started, --no-report is
    remembered). With ``lock`` (rank 0), no other process may train the run meanwhile."""
    run.require_run()
    if lock:
        run.lock()
    if not run.last_checkpoint.is_file():
        raise CifarlensError(f"{run.path} has no checkpoints/last.pt to resume from; start it again with --force")
    if run.meta().get("status") == "finished":
        missing = run.meta().get("report", True) and not (run / "report.html").is_file()
        raise CifarlensError(f"{run.path} has finished training: nothing to resume (cifarlens evaluate "
                             f"{run.path} evaluates it again" + (f"; cifarlens report {run.path} writes the report "
                                                                  "it lacks" if missing else "") + ")")
    report = run.meta().get("report", True) if report is None else report
    cfg = run.config()
    if lock and run.lacks_settings():  # an older cifarlens's file: completed with the values it runs with,
        run.update_config(cfg)  # as the checkpoints it writes now have them (else every command warned of a loss)
    cfg = replace(cfg, train=replace(cfg.train, device=device))
    return replace(cfg, data=run.data_settings(cfg.data, data_dir)), report  # same images: check_resumed_data


def check_resumed_data(run: RunDir, cfg: RunConfig, bundle: DataBundle, *, log: Callable[[str], None],
                       write: bool) -> None:
    """Refuse other images than those the run started on (it goes on training, validating and
    testing on its own); the same images moved (--data-dir) update config.yaml when ``write``."""
    others = [split for split in ("train", "val", "test") if not check_same_data(run.meta(), bundle, split, run.path)]
    if others and (run / SIGNATURES_FILE).is_file():  # without it (older runs), other pixels may be a decoder's
        raise CifarlensError(f"the {' and '.join(others)} images in {cfg.data.data_dir} are not those {run.path} "
                             "started on (see the warning): a resumed run goes on with its own data; point "
                             "--data-dir at it, or train a new run")
    if write and run.config().data.data_dir != cfg.data.data_dir:
        log(f"the run's data is now read from {cfg.data.data_dir} (config.yaml and run.json updated)")
        run.update_config(replace(run.config(), data=replace(run.config().data, data_dir=cfg.data.data_dir)))
        source = run.meta().get("source")
        if isinstance(source, dict) and source.get("path") != bundle.source.path:  # what the report names
            run.write_meta(source={**source, "path": bundle.source.path})


def go_on(run: RunDir, report: bool, log: Callable[[str], None]) -> None:
    """What a resumed run does before it trains on: its status, its outputs made from the weights it
    had (:func:`remove_stale_outputs`), and the temporary files of writes killed half-way (a SIGKILL
    during a checkpoint left a ``.last.pt.<hex>.tmp`` of the checkpoint's size until ``--force``).
    The run folder is claimed by now; only an ``export`` (which does not claim it) could be writing there
    at that moment: it then fails, and its file, made from the weights before, would be removed as stale."""
    run.write_meta(status="running")
    remove_stale_outputs(run, report, log)
    killed = remove_temporaries(run.path)
    if killed:
        log(f"removed {len(killed)} temporary file(s) of writes killed half-way: "
            f"{', '.join(str(p.relative_to(run.path)) for p in killed[:3])}{', ...' if len(killed) > 3 else ''}")


def remove_stale_outputs(run: RunDir, report: bool, log: Callable[[str], None], when: str = "before the run went on"
                         ) -> None:
    """What describes the run's weights as they were before it went on (or ``when`` they were
    made: while it trained): report.html, the exports in their default places (model.onnx,
    export/), which predict no more as the run does, and a temperature fitted on those weights
    (``cifarlens calibrate`` of it), which load_run would apply to the new ones."""
    import shutil

    meta = run.meta()
    if meta.get("calibration"):
        meta.pop("calibration")
        atomic_write_json(run / "run.json", meta)
        log(f"dropped the calibration temperature fitted {when}; " + (
            "a new one is fitted at the end" if run.config().train.calibrate else
            f"`cifarlens calibrate {run.path}` fits one to the new weights"))

    if (run / "report.html").is_file():  # `cifarlens report` of it
        (run / "report.html").unlink()
        log(f"removed report.html, written {when}; " + (
            "a new one is written at the end" if report else f"`cifarlens report {run.path}` writes a new one"))
    stale = [name for name in ("model.onnx", "model.uncalibrated.onnx", "export") if (run / name).exists()]
    for name in stale:
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    if stale:
        log(f"removed {', '.join(stale)}, exported {when} (`cifarlens export {run.path} --format onnx` "
            "exports the new weights; serve --backend onnx does it itself)")


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


def restore(run: RunDir, cfg: RunConfig, model, optimizer, scheduler, precision: Precision, device, ema,
            pruning=None) -> FitState:
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
        if pruning is not None:  # the images' last losses: which are left out next (train.prune_easy)
            pruning.load_state_dict(ckpt["pruning"])
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
    how = f"with --nproc {started}" if started > 1 else "without --nproc"
    return (f"{run.path} trained on {started} process(es) and goes on with {world_size}: the global batch is the same, "
            f"but the result will differ from an uninterrupted run (resume {how} to match it)")
