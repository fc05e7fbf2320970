"""The Python API the CLI, the web app and the tests share: train; calibrate and evaluate
(:mod:`cifarlens.evaluation`), load a run and predict (:mod:`cifarlens.inference`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cifarlens import distributed, tracking
from cifarlens.budget import budget_outcome, plan_budget, plan_settings
from cifarlens.checkpoint import save_checkpoint
from cifarlens.config import RunConfig, absolute_data_dir, to_dict, with_data_defaults
from cifarlens.data.pruning import EasyPruning
from cifarlens.data.pipeline import DataBundle, make_loader, prepare_data, train_transform
from cifarlens.data.policies import check_settings, unused_policy_settings
from cifarlens.ema import make_ema
from cifarlens.device import check_batch_memory, out_of_memory_error, retain_freed_memory
from cifarlens.distributed import World
from cifarlens.engine import (
    FitState,
    Precision,
    TrainingDiverged,
    fit,
)
from cifarlens.epochs import progressive_side
from cifarlens.errors import CifarlensError
from cifarlens.models import check_input_size, unwrap_model
from cifarlens.models.weights import input_info, load_initial_weights
from cifarlens.recipes import resolve_choices, resolve_train, unread_given
from cifarlens.schedules import (
    StepSchedule, build_optimizer, build_scheduler, epochs_before, param_groups, schedule_steps,
)
from cifarlens.evaluation import EVAL_BATCH_SIZE, calibrate_run, evaluate_run, finish_training, write_evaluation  # noqa: F401
from cifarlens.inference import Prediction, Run, build_model, check_same_data, load_run  # noqa: F401 (re-exported)
from cifarlens.resume import (check_resumed_data, go_on, remove_stale_outputs, restore, resumed_config,
                              world_size_note)
from cifarlens.newrun import log_new_run, record_new_run
from cifarlens.runs import RunDir


def train(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    on_epoch_end: Callable[[FitState, nn.Module], None] | None = None,
    evaluate_test: bool = True,
    bundle: DataBundle | None = None,
    report: bool | None = None,
    choices: dict[str, str] | None = None,
    data_dir: str | None = None,
) -> dict:
    """Train ``cfg`` into run folder ``out`` (or continue it with ``resume``); return the test metrics.

    ``on_epoch_end(state, model)`` is called after every epoch's checkpoint is written, with
    the model that is validated and saved (the EMA when there is one); benchmarks use it to
    time accuracy milestones. ``bundle`` reuses data already read for ``cfg.data``.
    With ``report``, ``report.html`` is written at the end (see cifarlens.report); None (default):
    yes for a new run, and as the run was started when it is resumed. ``data_dir``, with
    ``resume``: where the run's data is now (it must be the same images; config.yaml follows).
    A model or recipe left unset in ``cfg`` is chosen for the device and model
    (:func:`cifarlens.recipes.resolve_choices`); ``choices`` says why, for a caller (the CLI)
    that resolved them itself.

    Started by torchrun (WORLD_SIZE > 1), this process joins the process group and trains
    its shard with DistributedDataParallel; only rank 0 writes the run folder and returns
    the test metrics (the other ranks return ``{}``).
    """
    if not isinstance(cfg, RunConfig):  # a dict or a YAML path: an AttributeError from deep inside
        raise CifarlensError(f"train(cfg, out): cfg is a RunConfig (cifarlens.config: merge(RunConfig(), {{...}}), "
                             f"or from_dict / load_yaml of a file); got {type(cfg).__name__}")
    world, device, started = distributed.init(cfg.train.device)
    run = RunDir(out)
    try:
        # the global RNGs are seeded for the run (initialisation, each epoch's dropout) and given back as they
        # were: a notebook's own random draws after train() were the same in every session
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            return _train(cfg, run, world, device, resume=resume, force=force, on_epoch_end=on_epoch_end,
                          evaluate_test=evaluate_test, bundle=bundle, report=report,
                          choices=choices or {}, data_dir=data_dir)
    finally:
        run.unlock()
        distributed.shutdown(started)


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None when there is none: an atomic write replaces the inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _train(cfg: RunConfig, run: RunDir, world: World, device: torch.device, *, resume: bool, force: bool,
           on_epoch_end, evaluate_test: bool, bundle: DataBundle | None, report: bool | None,
           choices: dict[str, str], data_dir: str | None = None) -> dict:
    log = run.log if world.is_main else _quiet
    if resume:
        failed = None
        try:
            cfg, report = resumed_config(run, cfg.train.device, report, data_dir, lock=world.is_main)
        except CifarlensError as err:  # e.g. the folder locked by an evaluate: every rank stops, not rank 0 alone
            failed = err
        if (distributed.all_reduce_sum(failed is not None)[0] if world.distributed else failed is not None):
            raise failed or distributed.rank0_failed("resume the run")
    report = report is not False  # None: yes, for a new run
    tracking.check_available(cfg.track.loggers, cfg.track)  # a missing library stops here, before any run folder exists
    if world.is_main:
        tracking.check_reachable(cfg.track.loggers, cfg.track.tracking_uri)  # as does a server that is not there
    # (on resume this only fills keys that an older cifarlens did not write)
    cfg, why = resolve_choices(cfg, device.type)
    why = {**choices, **why}
    given, cfg = cfg.train, replace(cfg, train=resolve_train(cfg.train))
    if not resume:  # saved absolute: evaluate, serve and --resume find the data from any folder
        cfg = replace(cfg, data=absolute_data_dir(cfg.data))
    check_settings(cfg.data)  # before a run folder exists
    if cfg.train.sync_bn and world.distributed and device.type != "cuda":
        raise CifarlensError("train.sync_bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only")
    if cfg.train.time_budget and not resume and (world.distributed or cfg.train.compile):
        drop = "--nproc / torchrun" if world.distributed else "train.compile"
        raise CifarlensError(f"train.time_budget times single-process steps without torch.compile: drop {drop}, "
                             "or give --epochs instead")

    if not resume:  # an --out that run.create would refuse: said before the data is read
        distributed.on_rank0(world, lambda: run.check_new(force=force), "use the run folder")
    if bundle is None:
        bundle = prepare_data(cfg.data, cfg.train.seed, world)  # errors here leave no run folder behind
    elif bundle.info.name != cfg.data.dataset:  # a run would record cfg.data's dataset and train on another
        raise CifarlensError(f"the data given (bundle=) is {bundle.info.name}, but cfg.data.dataset is "
                             f"{cfg.data.dataset}; read the bundle for cfg.data, or leave bundle out")
    if not resume and bundle.source.kind != "official files" and bundle.source.path:
        data_dir = Path(bundle.source.path).resolve()
        if data_dir in (run.path.resolve(), *run.path.resolve().parents):
            # its figures would be read as images (a class named after the run) by every later reading
            raise CifarlensError(f"--out {run.path} is inside the image folder {bundle.source.path}, whose images "
                                 "its files would join; choose another --out")
    if resume:  # the data the run started on: it goes on training, validating and testing on the same images
        check_resumed_data(run, cfg, bundle, log=log, write=world.is_main)
    info = bundle.info
    has_val = len(bundle.val) > 0  # data.val_fraction 0: no validation split (fixed-budget recipes)
    if not has_val and (cfg.train.schedule == "plateau" or cfg.train.early_stopping):
        why = ("data.val_fraction is 0" if not with_data_defaults(cfg.data).val_fraction else
               f"the {len(bundle.train) + len(bundle.val)} training images are too few for data.val_fraction "
               f"{with_data_defaults(cfg.data).val_fraction:g} to leave one of a class out")
        raise CifarlensError(f"train.schedule plateau and train.early_stopping need a validation split, and {why}; "
                             "add training images or raise data.val_fraction, or use another schedule and "
                             "early_stopping 0")
    if cfg.data.augment is None:  # resolved, so the saved config says what ran
        cfg = replace(cfg, data=replace(cfg.data, augment=info.augment))
    torch.manual_seed(cfg.train.seed)  # model initialisation
    model = build_model(cfg, info).to(device)
    # starting weights (ImageNet, or --weights FILE) before the run folder exists, so a bad file
    # leaves none behind (on resume the checkpoint holds the weights); and the input normalisation
    # they expect (ImageNet's for pretrained backbones), written to run.json for evaluate/serve/export
    init = None if resume else load_initial_weights(model, cfg.model)
    # resumed: the statistics it started with (its weights file may have moved since)
    info = replace(info, mean=run.info().mean, std=run.info().std) if resume else input_info(cfg.model, info)
    first = progressive_side(info.image_size, 0, cfg.train.progressive_res, cfg.train.progressive_epochs)
    check_input_size(model, info.in_channels, {info.image_size, first}, cfg.model.name)  # before the run folder
    check_settings(cfg.data, info.image_size)  # crop padding and Cutout against the images' side
    if given.progressive_res and cfg.train.progressive_res >= info.image_size:  # a recipe's ramp is skipped so
        raise CifarlensError(f"train.progressive_res {cfg.train.progressive_res} is not smaller than the "
                             f"{info.image_size}-pixel images, so nothing would grow (e.g. 24 for 32 pixels; 0 = off)")
    if cfg.train.tta and cfg.train.tta_translate >= info.image_size:  # it failed after the first epoch
        raise CifarlensError(f"train.tta_translate {cfg.train.tta_translate} is not smaller than the "
                             f"{info.image_size}-pixel images (1 or 2 is usual for 32 pixels)")
    precision = Precision.for_device(device, cfg.train.amp, cfg.train.channels_last, cfg.train.cpu_amp)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    memory_warning = None
    if device.type == "cuda":  # training shapes are fixed: cuDNN times its kernels once and keeps the fastest
        torch.backends.cudnn.benchmark = True
    else:  # big tensors reuse freed memory instead of page-faulting fresh pages every step
        retain_freed_memory()
        # every rank's share of the global batch is in this machine's memory: refused before the OOM killer acts
        memory_warning = check_batch_memory(model, min(cfg.train.batch_size, len(bundle.train)),
                                            (info.in_channels, info.image_size, info.image_size), device)

    tc = cfg.train
    train_loader = make_loader(bundle.train, info, tc.batch_size, device, seed=tc.seed, train_cfg=cfg.data,
                               world=world)
    val_loader = make_loader(bundle.val, info, EVAL_BATCH_SIZE, device, world=world) if has_val else None
    pruning = None
    if tc.prune_easy:
        if not hasattr(train_loader, "pruning"):
            raise CifarlensError("train.prune_easy needs the batched loader (data.loader=batched)")
        pruning = train_loader.pruning = EasyPruning(len(bundle.train), tc.prune_easy, device)
    if hasattr(model, "data_init") and not resume and init is None:  # e.g. FastNet's patch whitening
        sample = bundle.train.images[:5000].to(device)
        # fit to the images' own patch statistics: the level's crop and flip, no policies (no cut-out squares)
        plain = train_transform(info, replace(cfg.data, policies=[]))
        model.data_init(plain(sample, torch.Generator(device).manual_seed(tc.seed)))
    state, plan = FitState(), None
    # config.yaml and the checkpoint's config: the settings as given, a time budget's recipe epochs among
    # them (so --config of it plans again, for its own machine); the plan is in run.json and state.replanned
    saved = cfg
    if tc.time_budget and not resume:  # epochs to fit the budget, timed before the run folder exists
        try:
            plan = plan_budget(model, train_loader, val_loader, precision, tc, tta=tc.tta and info.hflip)
        except (RuntimeError, MemoryError) as err:  # its timed steps are training steps: a GPU runs out here first
            oom = out_of_memory_error(err, device, tc.batch_size)
            if oom is None:
                raise
            raise oom from None
        cfg, tc, state.setup_seconds = replace(cfg, train=plan.train), plan.train, plan.probe_s
        state.replanned = plan_settings(tc)  # in every checkpoint: --resume goes on with it
        why["epochs"] = f"time budget {tc.time_budget:g} s"  # the loader starts each epoch afresh: no trace of timing
    # built before the run folder exists (or --force empties it): a setting they refuse leaves none behind
    if tc.sync_bn and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    ema = make_ema(model, tc.ema_decay)
    tta = tc.tta and info.hflip
    optimizer = build_optimizer(param_groups(model, tc), tc)  # head and backbone groups
    scheduler = build_scheduler(optimizer, tc, len(train_loader))
    if not resume:
        distributed.on_rank0(world, lambda: run.create(force=force), "create the run folder")
        if world.is_main:
            record_new_run(run, saved, why, bundle, info, model, init, plan, report, device, world.world_size)

    if resume:
        state = restore(run, cfg, model, optimizer, scheduler, precision, device, ema, pruning)
        log(f"resuming {run.path} after epoch {state.epoch}/{replace(tc, **state.replanned).epochs}")
        moved = world_size_note(run, world.world_size)
        if moved:
            log(f"warning: {moved}")
    else:
        log_new_run(log, run, cfg, why, bundle, info, model, init, plan,
                    [*bundle.source.warnings, *unread_given(given, cfg.train), *unused_policy_settings(cfg.data),
                     *tracking.unused_settings(cfg.track),
                     *[memory_warning] * bool(memory_warning)], device, world.world_size)
    train_model = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # a frozen backbone (train.freeze_epochs) gives no gradients: DDP must be told, or its
        # reducer waits for them; its grads then stay None, so the optimizer skips them
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=tc.freeze_epochs > 0 or tc.whiten_bias_epochs > 0)
    if tc.compile:
        # progressive resizing changes the input's width between epochs: by default torch.compile then
        # recompiles for symbolic sizes, which on an H200 took minutes per width and had not finished
        # fast_cpu_10min's 8 epochs after 3.5 minutes (eager: 21 s); one static graph per width is what
        # a few fixed widths want (docs/benchmarks.md, *On a GPU*)
        train_model = torch.compile(train_model, dynamic=False if tc.progressive_res else None)

    eval_model = ema.module if ema is not None else model

    def save_best(state: FitState) -> None:
        if not world.is_main:
            return
        run.save_weights(unwrap_model(eval_model).state_dict(),  # mean/std: for a --weights start from it
                         {"epoch": state.best_epoch, "val_loss": state.best_val_loss, "model": cfg.model.name,
                          "mean": list(info.mean), "std": list(info.std)})

    checkpointed = [state.epoch]  # the last epoch whose checkpoint is written: what a stop records

    def end_epoch(state: FitState) -> None:
        if plan is not None:  # before the checkpoint, which saves the re-plan with the schedule
            new, lines = plan.replan(state.epoch, state.seconds)
            if new is not None:
                state.replanned = plan_settings(new)
                if isinstance(scheduler, StepSchedule):
                    scheduler.retarget(schedule_steps(new, len(train_loader)))
                    if scheduler.milestones:  # they moved with the steps left: recorded in epochs, as configured
                        state.replanned["milestones"] = [round(epochs_before(new, m, len(train_loader)), 3)
                                                         for m in scheduler.milestones]
                        lines.append(f"the learning rate now drops after epochs "
                                     f"{', '.join(f'{m:g}' for m in state.replanned['milestones'])}")
            for line in lines:
                log(line)
            if new is not None and world.is_main:  # in run.json now: a resumed run (no plan of its own) keeps it
                run.write_meta(time_budget=plan.as_dict(state.replanned.get("milestones")))
        if world.is_main:
            run.write_history(state.history)
            before = _file_id(run.last_checkpoint)
            try:
                save_checkpoint(run.last_checkpoint, {
                    "model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": precision.scaler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None, "state": vars(state),
                    "pruning": pruning.state_dict() if pruning is not None else None,
                    "config": to_dict(saved),  # as config.yaml: a resumed run checks that file against it
                })
            except BaseException:  # a Ctrl-C just after the rename: the file on disk holds this epoch, as resume says
                if _file_id(run.last_checkpoint) != before:
                    checkpointed[0] = state.epoch
                raise
            checkpointed[0] = state.epoch
            # after the checkpoint: a stop before it left no logged epoch that --resume trains again (a
            # duplicate step in MLflow); one after it, an epoch that --resume logs (tracker.log_resumed)
            tracker.log_epoch(state.history[-1])
        checkpointed[0] = state.epoch
        distributed.barrier()  # a checkpoint is complete before any rank goes on (resume reads it)
        if on_epoch_end is not None:
            on_epoch_end(state, eval_model)

    try:
        tracker = (tracking.start(cfg, run, resume=resume, history=state.history, log=log) if world.is_main
                   else tracking.Trackers())
    except BaseException:  # a store that refuses or hangs (Ctrl-C): nothing trained yet, the run as it was
        if world.is_main and not resume:
            run.discard()
        raise
    if resume and world.is_main:  # it trains on from here: its exports describe older weights
        go_on(run, report, log)
    try:
        state = fit(model, train_loader, val_loader, optimizer, scheduler, precision, tc, state,
                    on_improvement=save_best, on_epoch_end=end_epoch, log=log, train_model=train_model,
                    ema=ema, tta=tta)
    except BaseException as caught:
        err = out_of_memory_error(caught, device, tc.batch_size) or distributed.lost_peer(caught, world) or caught
        if world.is_main:
            # diverged: the loss blew up (fix the hyperparameters); failed: another clear error;
            # interrupted: Ctrl-C, SIGTERM, a crash or another rank gone (resume it)
            status = ("diverged" if isinstance(err, TrainingDiverged) else
                      "interrupted" if isinstance(err, distributed.PeerLost) else
                      "failed" if isinstance(err, CifarlensError) else "interrupted")
            # (fit counts an epoch before its checkpoint is written: a stop in between goes on from the one before)
            run.write_meta(status=status, epochs_done=checkpointed[0])
            run.note_stop(status, err, checkpointed[0])
            tracker.close(status)
        if tc.compile and isinstance(err, torch._dynamo.exc.TorchDynamoException):  # e.g. no C++ compiler on CPU
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise CifarlensError(f"torch.compile failed ({first}); train without --set train.compile=true") from err
        if err is not caught:
            raise err from None
        raise
    if not world.is_main:  # rank 0 alone finishes the run folder and evaluates on the test set
        return {}
    remove_stale_outputs(run, report, log, when="while the run trained")  # `export` or `report` of it meanwhile
    train_seconds = state.seconds
    if tc.time_budget:
        log(budget_outcome(tc, plan, state.replanned, state.epoch, train_seconds))
    # "finished" once evaluated: a run stopped before that is resumed, and only evaluates
    run.write_meta(epochs_done=state.epoch, best_epoch=state.best_epoch,
                   best_val_loss=state.best_val_loss if has_val else None, stopped_early=state.stopped_early,
                   train_seconds=train_seconds, **({"time_budget": plan.as_dict(state.replanned.get("milestones"))} if plan is not None else {}))

    def quick_report() -> None:  # within ~10 % of the training time; `cifarlens report RUN` writes the full one
        from cifarlens.report import default_budget, write_report

        write_report(load_run(run.path, device=str(device)), bundle=bundle, budget_s=default_budget(train_seconds),
                     log=run.log)

    try:
        result = finish_training(run, cfg, state, device, bundle, tracker, evaluate_test=evaluate_test,
                                 has_val=has_val, report=quick_report if report else None)
    except BaseException as err:
        status = "failed" if isinstance(err, CifarlensError) else "interrupted"
        if run.meta().get("status") == "finished":  # evaluated: only its report is missing
            run.note_stop("finished, the report not written", err, state.epoch)
        else:
            run.write_meta(status=status)
            run.note_stop(status, err, state.epoch)
        tracker.close(status)
        raise
    run.write_meta(status="finished")
    return result | {"train_seconds": train_seconds}


def _quiet(line: str) -> None:
    """The log of ranks other than 0: they train silently."""

