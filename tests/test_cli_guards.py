"""User mistakes and signals around ``cifarlens train``: refused before anything is written,
recorded as they happened, and never at the cost of an earlier run."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifarlens.api import train
from cifarlens.cli import main
from cifarlens.config import RunConfig, merge
from cifarlens.engine import TrainingDiverged
from cifarlens.errors import CifarlensError
from conftest import TINY, make_cifar10, make_fashion_mnist, make_imagefolder


def files(run: Path) -> dict[Path, bytes]:
    """Every file of a run folder and its bytes: what a refused command must leave as it was."""
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    data = make_fashion_mnist(root / "data", n_train=200, n_test=40)
    out = root / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--no-report", "--out", str(out), *TINY]) == 0
    return out, data


@pytest.mark.parametrize("flags, message", [
    (["--recipe", "reference", "--set", "train.optimizer=sgd", "--set", "train.nesterov=true",
      "--set", "train.momentum=0"], "train.momentum must be in [0, 1), and > 0 with train.nesterov"),
    (["--set", "train.momentum=-3"], "train.momentum must be in [0, 1)"),
    (["--recipe", "reference", "--set", "train.plateau_factor=1"], "train.plateau_factor must be in (0, 1)"),
    (["--lr", "inf"], "train.lr must be > 0 and finite"),
    (["--set", "data.image_size=4"], "cannot take 4x4 images"),
    (["--set", "model.kwargs={num_classes: 5}"], "model.kwargs cannot set num_classes: it comes from the dataset"),
    (["--set", "train.tta=true", "--set", "train.tta_translate=40"],
     "train.tta_translate 40 is not smaller than the 28-pixel images"),
    # trained silently at full size throughout
    (["--set", "train.progressive_res=1000", "--set", "train.progressive_epochs=1"],
     "train.progressive_res 1000 is not smaller than the 28-pixel images"),
    (["--set", "train.epochs="], "--set 'train.epochs=' has no value"),  # $EPOCHS unset: the recipe's, silently
    (["--set", "data.flip=no"], "must be str, got False (YAML read it as a boolean: quote it"),  # "as a number"
    (["--set", "model.kwargs={1: 2}"], "config key 'model.kwargs' takes names as keys, got 1"),  # TypeError
    (["--set", "train.milestones={[1]: 2}"], "a key cannot be a list or a mapping (line 1)"),  # TypeError
])
def test_a_bad_setting_with_force_leaves_the_finished_run_as_it_was(finished_run, tmp_path, capsys, flags, message):
    """These settings used to fail after --force had emptied the folder (the optimizer, the schedule
    or the first forward pass refused them): now they are refused first, and the run stays whole."""
    out, data = finished_run
    before = files(out)
    model = ["--model", "fastnet_cpu", "--set", "model.kwargs={widths: [8, 16]}"] if "image_size" in flags[1] else TINY
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--no-report", "--out", str(out), "--force", *model, *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    after = files(out)
    assert after == before


def test_a_config_resolved_once_is_not_warned_about_again_and_bench_checks_every_seed(finished_run, capsys):
    """bench and tune resolve a config and train() resolves it again: fast_cpu_10min cut to 1 epoch
    then warned "train.progressive_epochs=0 is not used". bench --seed S --seeds N checked S alone,
    and the seed out of range failed after the first had trained, losing its figures."""
    from dataclasses import replace

    from cifarlens.recipes import resolve_train, unread_given

    once = resolve_train(merge(RunConfig(), {"train": {"recipe": "fast_cpu_10min", "epochs": 1}}).train)
    assert once.progressive_epochs == 0 and unread_given(once, resolve_train(once)) == []
    assert unread_given(replace(once, progressive_res=0, progressive_epochs=3), resolve_train(replace(
        once, progressive_res=0, progressive_epochs=3))) == ["train.progressive_epochs=3 is not used (train."
                                                            "progressive_res is 0)"]  # one given: still said
    _, data = finished_run
    assert main(["bench", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1", *TINY,
                 "--seed", str(2**63 - 1), "--seeds", "2"]) == 2
    captured = capsys.readouterr()
    assert "train.seed must be a whole number from 0 to 2**63 - 1, got 9223372036854775808" in captured.err
    assert "[bench seed" not in captured.out  # before any seed trained


def test_settings_the_run_does_not_read_are_said_so(finished_run, tmp_path, capsys):
    """--set train.milestones=[1] under a one-cycle schedule changed nothing, silently; so did
    --set data.cutout_size=8 without Cutout."""
    _, data = finished_run
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--no-report", "--out", str(out), "--recipe", "modern", "--set", "train.milestones=[1, .nan]",
                 "--set", "train.warmup_epochs=1e300",  # (nan: a ValueError; 1e300 counted its epochs forever)
                 "--set", "train.muon_lr=0.1", "--set", "train.gamma=0.1", "--set", "train.momentum=0.8",
                 "--set", "data.cutout_size=8", "--set", "data.workers=4", "--set", "data.cutmix_prob=0.5",
                 "--augment", "noise", "--set", "data.noise_std=0.2",
                 "--tracking-uri", str(tmp_path / "mlruns"), *TINY]) == 0
    log = (out / "train.log").read_text()
    assert "warning: train.milestones=[1.0, nan] is not used (schedule onecycle; they are multistep's)" in log
    assert "warning: train.muon_lr=0.1 is not used (optimizer sgd; they are muon's)" in log
    assert "train.gamma" not in log and "train.momentum" not in log  # the recipe's value / a setting it reads
    assert f"track.tracking_uri {tmp_path / 'mlruns'} is not used: it is MLflow's" in log
    # policy settings without their policy (cutmix_prob 0.5 is its default: nothing changed, nothing said)
    assert "warning: data.cutout_size=8 is not used (no cutout in data.policies; add it with --augment LEVEL+cutout)" \
        in log
    assert "warning: data.workers=4 is not used (the batched loader" in log
    assert "noise_std" not in log.split("warning:", 1)[1] and "cutmix" not in log  # noise is on
    assert "train.muon_lr=0.1 is not used" in capsys.readouterr().out


def test_a_run_folder_is_never_made_inside_another(finished_run, capsys):
    """--out RUN/checkpoints/inner was accepted, and RUN's --force then deleted it."""
    out, data = finished_run
    for inner in (out / "checkpoints" / "inner", out / "sub"):
        assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                     "--no-report", "--out", str(inner), *TINY]) == 2
        assert f"is inside the run folder {out}; choose another --out" in capsys.readouterr().err
        assert not inner.exists()
    # said before the data is read (it was refused only once a download or a long read had been done)
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(out / "nowhere"), "--no-download",
                 "--epochs", "1", "--out", str(out / "sub")]) == 2
    assert f"is inside the run folder {out}" in capsys.readouterr().err
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(out / "nowhere"), "--no-download",
                 "--epochs", "1", "--out", str(out)]) == 2  # an existing run without --force: likewise
    err = capsys.readouterr().err  # a finished one: not "use --resume", which refuses it
    assert f"run folder {out} already exists (a finished run); --force to overwrite it" in err and "--resume" not in err


def test_a_dangling_link_as_out_is_named(tmp_path, capsys):
    """--out LINK whose target does not exist said only "File exists: LINK" (mkdir's error)."""
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "elsewhere" / "run")
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--no-download",
                 "--epochs", "1", "--out", str(link)]) == 2
    assert f"--out {link} is a link to {tmp_path / 'elsewhere' / 'run'}, which does not exist" in \
        capsys.readouterr().err
    assert link.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_an_out_inside_the_image_folder_or_another_programs_folder_is_refused(tmp_path, capsys):
    """--out DATA/train/myrun trained, and the run's figures became a class 'myrun' for every later
    reading; a folder of another program holding a config.yaml and a run.json was taken for a run,
    and --force deleted its checkpoints/ and tensorboard/."""
    data = make_imagefolder(tmp_path / "data", classes=("a", "b"), n_per_class=6, n_test_per_class=2, junk=False)
    common = ["train", "--dataset", "imagefolder", "--data-dir", str(data.data_dir), "--epochs", "1", "--no-report",
              *TINY]
    for inside in (data.data_dir / "train" / "myrun", data.data_dir / "run"):
        assert main([*common, "--out", str(inside)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is inside the image folder" in err and len(err.splitlines()) == 1, err
        assert not inside.exists()
    other = tmp_path / "proj"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "epoch_99.ckpt").write_text("w")
    (other / "config.yaml").write_text("lr: 0.1\n")
    (other / "run.json").write_text('{"name": "x"}')
    assert main([*common, "--out", str(other), "--force"]) == 2
    assert "is a non-empty folder that is not a cifarlens run (its run.json is not one cifarlens writes)" in \
        capsys.readouterr().err
    assert (other / "checkpoints" / "epoch_99.ckpt").read_text() == "w"


def test_a_start_that_fails_leaves_nothing_that_blocks_the_same_command(tmp_path, monkeypatch, capsys):
    """A full disk as the run folder was made left checkpoints/ behind, and the same command, even
    with --force, was refused: 'a non-empty folder that is not a cifarlens run'."""
    import errno

    import cifarlens.newrun

    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1", "--no-report",
            "--out", str(out), *TINY]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "environment.json"))

    with monkeypatch.context() as m:
        m.setattr(cifarlens.newrun, "environment_record", full)
        assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)  # as an older cifarlens left it
    (out / ".config.yaml.0123456789ab.tmp").write_text("half")  # and a write killed half-way
    assert main(args) == 0 and (out / "model.safetensors").is_file()
    (out / ".my-draft.tmp").write_text("the user's")  # not a temporary of ours: --force keeps it
    (out / ".metrics.json.0123456789ab.tmp").write_text("half")
    assert main([*args, "--force"]) == 0
    assert (out / ".my-draft.tmp").is_file() and not (out / ".metrics.json.0123456789ab.tmp").exists()


def test_a_force_that_fails_half_way_leaves_a_run_the_next_force_may_replace(finished_run, tmp_path, monkeypatch):
    """config.yaml and run.json went first: a file that could not be removed then left a folder every
    later --force refused as another program's."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    from cifarlens.runs import RunDir

    real_unlink = Path.unlink

    def stuck(self, missing_ok=False):
        if self.name == "metrics.json":
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", stuck)
        with pytest.raises(PermissionError):
            RunDir(out).create(force=True)
    assert RunDir(out).is_run()  # still a run folder, which --force may empty once the file can go
    RunDir(out).create(force=True)
    assert not (out / "metrics.json").exists() and not RunDir(out).is_run()


def test_a_stop_while_an_epoch_is_saved_records_the_epoch_it_goes_on_from(tmp_path, monkeypatch):
    """A SIGTERM after history.csv but before the checkpoint recorded 2 epochs done, and train.log
    said so, where the checkpoint (and --resume) hold 1."""
    import cifarlens.api

    real, calls = cifarlens.api.save_checkpoint, []

    def stopped_at_the_second(path, payload):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, payload)

    monkeypatch.setattr(cifarlens.api, "save_checkpoint", stopped_at_the_second)
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "3",
                 "--no-report", "--out", str(out), *TINY]) == 130
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["epochs_done"] == 1
    assert (out / "train.log").read_text().splitlines()[-1].startswith("interrupted (1 epoch(s) finished)")
    monkeypatch.setattr(cifarlens.api, "save_checkpoint", real)
    assert main(["train", "--resume", str(out)]) == 0
    assert [int(r["epoch"]) for r in csv.DictReader((out / "history.csv").open())] == [1, 2, 3]


def test_a_run_stopped_in_its_report_is_finished_and_says_how_to_write_the_report(tmp_path, monkeypatch, capsys):
    """Its status went back to interrupted though it was evaluated, and --resume then pointed at evaluate."""
    import cifarlens.report

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cifarlens.report, "write_report", stopped)
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--out", str(out), *TINY]) == 130
    assert f"`cifarlens report {out}` writes its report" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["status"] == "finished" and (out / "metrics.json").is_file()
    assert (out / "train.log").read_text().splitlines()[-1].startswith("finished, the report not written")
    assert main(["train", "--resume", str(out)]) == 2
    assert f"cifarlens report {out} writes the report it lacks" in capsys.readouterr().err


def test_a_validation_loss_that_is_not_finite_stops_the_run_as_diverged(tmp_path):
    """The training loss can stay finite while the weights the run validates have blown up (here:
    BatchNorm statistics poisoned after epoch 1); the run stops there instead of "finishing"
    without best weights."""
    data = make_cifar10(tmp_path / "data", n_train_per_batch=20, n_test=20)
    cfg = merge(RunConfig(), {
        "data": {"dataset": "cifar10", "data_dir": str(data.data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [4], "depths": [1]}},
        "train": {"recipe": "reference", "batch_size": 32, "epochs": 3},
    })

    def poison(state, model):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(math.nan)

    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the validation loss became nan after epoch 2 \(training loss"):
        train(cfg, run, on_epoch_end=poison, report=False)
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "diverged" and meta["epochs_done"] == 1
    assert (run / "model.safetensors").is_file()  # epoch 1's weights stay the best
    last = (run / "train.log").read_text().splitlines()[-1]  # the log said nothing of why it stopped
    assert last.startswith("diverged (1 epoch(s) finished): the validation loss became nan after epoch 2"), last


@pytest.mark.parametrize("sig, code, said", [
    (signal.SIGTERM, 143, "terminated"),
    # a closed terminal: the run was left "running", train.log without a last line
    pytest.param(signal.SIGHUP, 129, "terminated", marks=pytest.mark.slow),
])
def test_sigterm_marks_the_run_interrupted_and_it_resumes(tmp_path, sig, code, said):
    data = make_fashion_mnist(tmp_path / "data", n_train=400, n_test=40)
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "200",
            "--no-report", "--out", str(out), *TINY]
    # the signal's default disposition in the child, as in a terminal: under nohup (or a CI runner that
    # ignores SIGHUP) the child would inherit SIG_IGN, and train ignores SIGHUP then, by design
    proc = subprocess.Popen([sys.executable, "-m", "cifarlens.cli", *args], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "history.csv").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "history.csv").is_file(), "no epoch finished"
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == code and "Traceback" not in err
    assert f"{said}; continue with: cifarlens train --resume {out}" in err
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["epochs_done"] >= 1
    assert (out / "train.log").read_text().splitlines()[-1].startswith("interrupted (")


def test_a_run_folder_another_train_is_making_is_said_to_be_in_use(tmp_path, capsys):
    """Two trains started on one new --out: the second saw the first's folder before its run.json and
    called it "a non-empty folder that is not a cifarlens run"."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "train.log").write_text("run folder ...\n")  # what the first has written so far
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        data = make_fashion_mnist(tmp_path / "data", n_train=40, n_test=10)
        assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--out", str(out),
                     *TINY]) == 2
        assert f"run folder {out} is in use by another cifarlens process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--out", str(out),
                 *TINY]) == 2  # released: what the folder holds decides again
    assert "is a non-empty folder that is not a cifarlens run" in capsys.readouterr().err


@pytest.mark.slow  # ~5-7 s; CI runs it with the slow set (the default suite passed 7 minutes)
def test_a_run_folder_in_use_is_refused_to_force_and_resume(tmp_path, capsys):
    """A second train --force, or a --resume, beside a running training would mix two runs' files."""
    data = make_fashion_mnist(tmp_path / "data", n_train=400, n_test=40)
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--no-report", "--out", str(out),
            *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "cifarlens.cli", *args, "--epochs", "200"], stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "history.csv").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "history.csv").is_file(), "no epoch finished"
        config = (out / "config.yaml").read_bytes()
        capsys.readouterr()
        # nor evaluate, calibrate or report, whose figures, from the weights so far, would stay in the
        # finished run (written after its own final evaluation)
        for command in ([*args, "--epochs", "1", "--force"], ["train", "--resume", str(out)], ["evaluate", str(out)],
                        ["calibrate", str(out)], ["report", str(out)], ["robustness", str(out), "--images", "8"]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert f"run folder {out} is in use by another cifarlens process" in err, err
            assert "these are its weights so far" not in err, err  # evaluate and calibrate warned, then refused
        assert (out / "config.yaml").read_bytes() == config and proc.poll() is None  # the running one goes on
        assert not {"metrics.json", "report.html", "robustness.json"} & {p.name for p in out.iterdir()}
        assert "calibration" not in json.loads((out / "run.json").read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert main(["train", "--resume", str(out), "--set", "x=1"]) == 2  # (flags are refused as ever)
    capsys.readouterr()


def test_a_relative_data_dir_is_saved_absolute_so_the_run_works_from_anywhere(tmp_path, monkeypatch):
    make_fashion_mnist(tmp_path / "here" / "fm", n_train=200, n_test=40)
    monkeypatch.chdir(tmp_path / "here")
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", "fm", "--epochs", "1", "--no-report",
                 "--out", str(tmp_path / "run"), *TINY]) == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"data_dir: {tmp_path / 'here' / 'fm'}" in config
    monkeypatch.chdir(tmp_path)  # where "fm" is not
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert not (tmp_path / "fm").exists()  # nothing was downloaded or created here


def test_a_path_the_machine_refuses_gives_one_line(finished_run, tmp_path, capsys):
    _, data = finished_run
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--no-report", "--out", str(blocker / "run"), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("cifarlens: error: Not a directory") and str(blocker) in err, err
    assert blocker.read_text() == "not a folder"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """fastnet_cpu with fast_cpu: an EMA of the weights, flip TTA and a fitted temperature."""
    from conftest import train_tiny_cifar10

    return train_tiny_cifar10(tmp_path_factory.mktemp("ema"), "--set", "model.kwargs={widths: [8, 16]}")


def test_settings_lost_from_config_yaml_are_the_ones_the_run_trained_with(ema_run, tmp_path, capsys):
    """A deleted `tta: true` line turned TTA off in evaluate and predict, silently, and evaluate
    wrote the other figures over the run's."""
    import shutil

    from cifarlens.api import load_run

    run_dir = tmp_path / "run"
    shutil.copytree(ema_run[0], run_dir)
    before = json.loads((run_dir / "metrics.json").read_text())
    text = (run_dir / "config.yaml").read_text()
    assert "  tta: true\n" in text
    (run_dir / "config.yaml").write_text(text.replace("  tta: true\n", "").replace("  ema_decay:", "  #ema_decay:"))
    with pytest.warns(UserWarning, match=r"config.yaml lacks train.ema_decay, train.tta \(damaged or edited\)"):
        assert main(["evaluate", str(run_dir)]) == 0
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["accuracy"] == before["accuracy"] and after["confusion_matrix"] == before["confusion_matrix"]
    with pytest.warns(UserWarning, match="lacks train.ema_decay, train.tta"):  # every time, until it is restored
        assert load_run(run_dir, calibrated=False).tta
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"damaged")  # the weights file still serves, said so
    with pytest.warns(UserWarning, match="and the checkpoint that would hold them cannot be read"):
        assert not load_run(run_dir, calibrated=False).tta


def test_explain_gives_the_prediction_and_probability_predict_gives(ema_run):
    """explain once captioned its maps with a plain softmax of one view, while predict, evaluate and
    serve use the run's TTA and temperature; --mistakes then picked images evaluate counted right."""
    from cifarlens.api import load_run
    from cifarlens.explain import explain_run

    run = load_run(ema_run[0])
    assert run.tta and run.calibrated
    images = run.data().test.images[:16]
    expl = explain_run(run, images)
    probs = run.predict_proba(images)
    assert torch.allclose(expl.probs, probs, atol=1e-6)
    assert torch.equal(expl.predictions, probs.argmax(1)) and torch.equal(expl.targets.cpu(), probs.argmax(1))
    other = explain_run(run, images, target=3)  # a chosen class: the map changes, the prediction does not
    assert torch.equal(other.predictions, expl.predictions) and (other.targets == 3).all()


def test_a_run_that_lost_its_best_weights_warns_and_uses_the_weights_it_validated(ema_run, tmp_path):
    import shutil

    from cifarlens.api import load_run
    from cifarlens.checkpoint import load_weights

    copy = tmp_path / "run"
    shutil.copytree(ema_run[0], copy)
    best = load_weights(copy / "model.safetensors")  # 1 epoch: the best epoch is the last
    (copy / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match="model.safetensors is missing: using the last epoch's weights"):
        run = load_run(copy)
    state = run.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best.items())  # the EMA's, not the raw model's
    # on the command line, one line for the user rather than Python's file, line and source line
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    proc = subprocess.run([sys.executable, "-m", "cifarlens.cli", "predict", str(copy), str(tmp_path / "red.png")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip()
    assert proc.stderr.splitlines() == [f"cifarlens: warning: {copy / 'model.safetensors'} is missing: using the last "
                                        f"epoch's weights from {copy / 'checkpoints' / 'last.pt'}, which may not be "
                                        "the best epoch's"]


def test_predict_takes_one_image_alone_and_refuses_a_topk_below_1(ema_run, capsys):
    from cifarlens.api import load_run
    from cifarlens.errors import CifarlensError
    from PIL import Image

    run = load_run(ema_run[0])
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert run.predict(image, topk=2)[0].labels == run.predict([image], topk=2)[0].labels
    assert run.predict([]) == []
    with pytest.raises(CifarlensError, match="topk must be a whole number >= 1"):
        run.predict([image], topk=0)
    path = ema_run[0] / "red.png"
    image.save(path)
    assert main(["predict", str(ema_run[0]), str(path), "--topk", "-1"]) == 2
    assert "topk must be a whole number >= 1" in capsys.readouterr().err
    assert main(["predict", str(path), str(ema_run[0])]) == 2  # swapped: the run's files were warned of as images
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cifarlens: error: {path} is a file; a run is the folder that"), err
    path.unlink()


def test_an_image_named_like_a_summary_figure_keeps_its_own_panel(ema_run, tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    for name in ("gallery", "class_average", "ship"):
        Image.new("RGB", (32, 32), (10, 90, 200)).save(src / f"{name}.png")
    out = tmp_path / "out"
    assert main(["explain", str(ema_run[0]), *(str(p) for p in sorted(src.iterdir())), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert {"gallery.png", "gallery-2.png", "class_average-2.png", "ship.png"} <= set(names), names


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    out, _ = finished_run
    before = files(out)
    assert main(["train", "--resume", str(out)]) == 2
    assert "has finished training: nothing to resume" in capsys.readouterr().err
    assert files(out) == before


def test_a_time_budget_with_nproc_is_refused_before_torchrun_starts(finished_run, tmp_path, capsys):
    _, data = finished_run
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--time-budget", "1m",
                 "--nproc", "2", "--no-report", "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "drop --nproc" in err and len(err.splitlines()) == 1, err  # no torchrun lines
    assert not (tmp_path / "run").exists()


def test_too_few_images_for_a_validation_split_is_said_so(tmp_path, capsys):
    """One image per class leaves none for validation, whatever data.val_fraction says."""
    data = make_imagefolder(tmp_path / "one", classes=("a", "b"), n_per_class=1, n_test_per_class=1, junk=False)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(data.data_dir), "--recipe", "reference",
                 "--epochs", "1", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "the 2 training images are too few for data.val_fraction 0.1" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture
def stopped_run(tmp_path):
    """A run stopped after its first of 3 epochs, and its data."""
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    cfg = merge(RunConfig(), {"data": {"dataset": "fashion-mnist", "data_dir": str(data.data_dir), "download": False},
                              "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
                              "train": {"batch_size": 32, "epochs": 3}})

    def stop(state, model):
        if state.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, on_epoch_end=stop, report=False)
    return out, data


def test_a_run_folder_moved_during_training_stops_the_run_instead_of_splitting_it(tmp_path):
    """Moving the run folder away during training made the next write (atomic_write makes parents)
    start a second folder at the old place, holding the rest of the run."""
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out, moved = tmp_path / "run", tmp_path / "moved"
    cfg = merge(RunConfig(), {"data": {"dataset": "fashion-mnist", "data_dir": str(data.data_dir), "download": False},
                              "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
                              "train": {"batch_size": 32, "epochs": 3}})

    def move(state, model):
        if state.epoch == 1:
            out.rename(moved)

    with pytest.raises(CifarlensError, match=f"the run folder {out} was moved or deleted while the run trained"):
        train(cfg, out, on_epoch_end=move, report=False)
    assert not out.exists(), sorted(p.name for p in out.rglob('*'))  # no second, partial run
    assert (moved / "checkpoints" / "last.pt").is_file()
    assert main(["train", "--resume", str(moved), "--no-report"]) == 0  # it goes on where it is now
    assert json.loads((moved / "run.json").read_text())["status"] == "finished"


def test_the_hint_after_a_stop_follows_what_the_run_folder_holds(stopped_run):
    """The --nproc launcher said "continue with --resume" for a run stopped before its first epoch
    ended, which --resume then refused (no checkpoint)."""
    from cifarlens.launcher import resume_hint as _resume_hint

    out, _ = stopped_run
    assert _resume_hint(str(out), nproc=2) == f"; continue with: cifarlens train --resume {out} --nproc 2"
    (out / "checkpoints" / "last.pt").unlink()
    assert _resume_hint(str(out), nproc=2) == f"; no epoch had finished: start it again with --force (--out {out})"


def test_resume_takes_a_moved_data_dir_and_refuses_an_edited_config(stopped_run, tmp_path, capsys):
    out, data = stopped_run
    (out / "report.html").write_text("<p>the run after epoch 1</p>")
    config = (out / "config.yaml").read_text()
    edited = re.sub(r"(?m)^  lr: ", "  lr: 1", config, count=1)  # e.g. 0.1 -> 10.1
    assert edited != config
    (out / "config.yaml").write_text(edited)
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml of" in err and "was changed after the run started (train.lr: " in err, err
    (out / "config.yaml").write_text(config)

    assert main(["train", "--resume", str(out), "--out", str(tmp_path / "elsewhere")]) == 2
    assert f"drop --out {tmp_path / 'elsewhere'}" in capsys.readouterr().err
    # a --data-dir with the same labels over other training images: refused before any training, the
    # config kept (it went on training on them, then failed at the end with config.yaml changed)
    from conftest import write_idx

    other = tmp_path / "other"
    shutil.copytree(data.data_dir, other)
    images = data.train_images[:, 0].copy()
    images[:] = 255 - images  # the same labels, other pixels
    write_idx(other / "train-images-idx3-ubyte", images, gz=True)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--data-dir", str(other)]) == 2
    assert "are not those" in capsys.readouterr().err and (out / "config.yaml").read_text() == config
    moved = tmp_path / "moved"
    data.data_dir.rename(moved)
    assert main(["train", "--resume", str(out), "--data-dir", str(moved)]) == 0
    assert f"data_dir: {moved}" in (out / "config.yaml").read_text()
    assert json.loads((out / "run.json").read_text())["source"]["path"] == str(moved)  # what the report names
    assert (out / "config.yaml").read_text().splitlines()[0] == config.splitlines()[0]  # its notes kept
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert not (out / "report.html").exists()  # it described the run after epoch 1
    assert "removed report.html" in (out / "train.log").read_text()


def test_the_same_train_again_suggests_resume_only_where_there_is_a_checkpoint(stopped_run, capsys):
    """A run killed before its first checkpoint was told "use --resume", which then said there was
    no checkpoints/last.pt to resume from."""
    out, data = stopped_run
    again = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--no-download", "--epochs", "1",
             "--out", str(out)]
    assert main(again) == 2
    assert f"run folder {out} already exists; use --resume to continue it, --force" in capsys.readouterr().err
    (out / "checkpoints" / "last.pt").unlink()
    assert main(again) == 2
    err = capsys.readouterr().err
    assert f"run folder {out} already exists (stopped before its first checkpoint); --force" in err
    assert "--resume" not in err


def test_an_export_of_a_stopped_run_says_so_and_a_resume_removes_it(stopped_run, capsys):
    """An export of epoch 1's weights said nothing, recorded nothing, and stayed beside the
    finished run's weights after the resume."""
    out, _ = stopped_run
    assert main(["export", str(out), "--format", "safetensors"]) == 0
    assert f"{out} was interrupted after 1 epoch(s): these are its weights so far" in capsys.readouterr().err
    described = json.loads((out / "export" / "model.json").read_text())
    assert described["run_status"] == {"status": "interrupted", "epochs_done": 1}
    assert main(["export", str(out), "--format", "onnx"]) == 0 and (out / "model.onnx").is_file()
    assert main(["calibrate", str(out)]) == 0  # a temperature for epoch 1's weights, which load_run then kept using
    early = json.loads((out / "run.json").read_text())["calibration"]["temperature"]
    # a SIGKILL during a checkpoint left its temporary file until --force; the user's own .tmp stays
    (out / "checkpoints" / ".last.pt.0123456789ab.tmp").write_bytes(b"half a checkpoint")
    (out / ".draft.tmp").write_text("mine")
    assert main(["train", "--resume", str(out), "--no-report"]) == 0
    assert not (out / "model.onnx").exists() and not (out / "export").exists()
    assert not (out / "checkpoints" / ".last.pt.0123456789ab.tmp").exists() and (out / ".draft.tmp").is_file()
    log = (out / "train.log").read_text()
    assert "removed model.onnx, export, exported before the run went on" in log
    assert "removed 1 temporary file(s) of writes killed half-way: checkpoints/.last.pt.0123456789ab.tmp" in log
    assert "dropped the calibration temperature fitted before the run went on; a new one is fitted at the end" in log
    assert json.loads((out / "run.json").read_text())["calibration"]["temperature"] != early  # fitted again


def test_a_resumed_run_of_an_older_cifarlens_completes_its_config_yaml(stopped_run, recwarn):
    """Its checkpoints, written now, hold every setting; config.yaml did not, and every later command
    warned of settings lost."""
    from cifarlens.checkpoint import load_checkpoint, save_checkpoint

    out, _ = stopped_run
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(re.sub(r"(?m)^  tta_translate: .*\n", "", config))
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    del ckpt["config"]["train"]["tta_translate"]  # as an older cifarlens wrote it
    save_checkpoint(out / "checkpoints" / "last.pt", ckpt)
    assert main(["train", "--resume", str(out), "--no-report"]) == 0
    assert "  tta_translate: null\n" in (out / "config.yaml").read_text()  # (the recipe's, as the run had it)
    assert main(["evaluate", str(out)]) == 0
    assert not [w for w in recwarn if "lacks" in str(w.message)]


def test_a_stopped_run_on_an_image_folder_resumes(tmp_path):
    """A copy never downloads (data.download is set to false for it): not an edit of config.yaml."""
    data = make_imagefolder(tmp_path / "data", classes=("a", "b"), n_per_class=20, n_test_per_class=4)
    out = tmp_path / "run"
    cfg = merge(RunConfig(), {"data": {"dataset": "imagefolder", "data_dir": str(data.data_dir)},  # download: default
                              "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
                              "train": {"batch_size": 16, "epochs": 2}})

    def stop(state, model):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, on_epoch_end=stop, report=False)
    assert main(["train", "--resume", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("name, text, message", [
    ("run.json", "[]", "holds a list, not a JSON object"),
    ("run.json", "{}", 'has no usable "dataset" record'),
    ("run.json", b"\xff\xfe\x00", "is unreadable"),
    ("config.yaml", "", "is empty or damaged"),
])
def test_a_damaged_run_folder_is_one_line(finished_run, tmp_path, capsys, name, text, message):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    (out / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cifarlens: error: ") and message in err and len(err.splitlines()) == 1, err


def test_nonsense_in_a_run_json_is_one_line_not_a_traceback_nor_a_silent_change(finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    meta = json.loads((out / "run.json").read_text())
    for key, value, message in (("mean", "abc", "mean ['a', 'b', 'c'] is not 1 number(s)"),
                                ("std", [-0.3], "std [-0.3] is not 1 number(s) > 0"),
                                ("image_size", 0, "image_size 0 is not a width in pixels"),
                                ("classes", [*meta["dataset"]["classes"][:-1], meta["dataset"]["classes"][0]],
                                 f"its classes name {meta['dataset']['classes'][0]!r} twice")):  # was accepted
        (out / "run.json").write_text(json.dumps({**meta, "dataset": {**meta["dataset"], key: value}}))
        assert main(["evaluate", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "the run folder" not in err and len(err.splitlines()) == 1, err
    (out / "run.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["predict", str(out), str(out / "curves.png"), "--json", "--no-calibration"]) == 0
    raw = json.loads(capsys.readouterr().out)
    # a temperature that is no temperature, or one no fit gives (1e-300 made every probability NaN, 1e308
    # every one 1/K): the raw softmax, said so
    for temperature, shown in ((0, "0"), (-1, "-1"), ("x", "'x'"), (1e-300, "1e-300"), (1e308, "1e\\+308")):
        (out / "run.json").write_text(json.dumps({**meta, "calibration": {"temperature": temperature}}))
        with pytest.warns(UserWarning, match=f"temperature {shown} is not one a fit gives"):
            assert main(["predict", str(out), str(out / "curves.png"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == raw


@pytest.mark.parametrize("text", ['{"accuracy": "high"}', "[1, 2]"])
def test_compare_names_a_damaged_metrics_file(finished_run, tmp_path, capsys, text):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    (out / "metrics.json").write_text(text)
    capsys.readouterr()
    assert main(["compare", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{out / 'metrics.json'} is damaged" in err and len(err.splitlines()) == 1, err


def test_a_shipped_val_folder_is_the_validation_split_and_the_log_says_so(tmp_path):
    """data.val_fraction was ignored without a word when the data has its own val/."""
    data = make_imagefolder(tmp_path / "data", classes=("a", "b"), n_per_class=8, n_test_per_class=2,
                            n_val_per_class=3, junk=False)
    cfg = merge(RunConfig(), {"data": {"dataset": "imagefolder", "data_dir": str(data.data_dir), "val_fraction": 0.5},
                              "model": {"name": "lensnet_light", "kwargs": {"widths": [8], "depths": [1]}},
                              "train": {"batch_size": 8, "epochs": 1}})
    train(cfg, tmp_path / "run", report=False)
    assert "validation split: the data's own val/ (6 images); data.val_fraction is not used" in \
        (tmp_path / "run" / "train.log").read_text()


def test_compare_shows_how_far_an_unfinished_run_got(stopped_run, capsys):
    """compare collected the status but showed neither it nor the epochs' time ("—")."""
    out, _ = stopped_run
    capsys.readouterr()
    assert main(["compare", str(out)]) == 0
    row = capsys.readouterr().out.splitlines()[2]  # the header, its rule, then the run
    assert "1/3 interrupted" in row and re.search(r"\d+(\.\d+)?\s*s so far", row), row


def test_a_checkpoint_that_cannot_be_written_names_the_file(tmp_path, monkeypatch, capsys):
    """torch's zip writer reports a failed write as a RuntimeError ("unexpected pos", as on a full
    disk; with less than 1 MiB free that is the full disk's one-line error, checked by hand on a
    2 MiB tmpfs: "No space left on device: RUN/model.safetensors")."""
    import cifarlens.checkpoint as checkpoint

    def full(payload, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--no-report", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"cifarlens: error: could not write {out / 'checkpoints' / 'last.pt'} ([enforce fail at " \
                  "inline_container.cc:672] . unexpected pos 64 vs 0)"
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert list((out / "checkpoints").iterdir()) == []  # no partial file left


def test_predict_reads_folders_goes_on_past_an_unreadable_file_and_says_so(ema_run, tmp_path, capsys):
    import json

    from PIL import Image

    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(folder / "more" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["predict", str(ema_run[0]), str(folder), str(broken), "--json", "--topk", "2"]) == 1
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert [r["image"] for r in result] == [str(folder / "a.png"), str(folder / "more" / "b.jpg"), str(broken)]
    assert len(result[0]["top"]) == 2 and "cannot read image" in result[2]["error"]
    assert "1 file(s) under" in printed.err and "1 of 3 images could not be read" in printed.err
    # the same as a CSV file, one row per image; a folder, or one of the images, is refused as the CSV
    table = tmp_path / "predictions.csv"
    assert main(["predict", str(ema_run[0]), str(folder), str(broken), "--topk", "2", "--csv", str(table)]) == 1
    import csv
    rows = list(csv.DictReader(table.open()))
    assert [r["image"] for r in rows] == [r["image"] for r in result]
    assert [r["label_1"] for r in rows[:2]] == [r["top"][0]["label"] for r in result[:2]]
    assert [float(r["prob_2"]) for r in rows[:2]] == pytest.approx([r["top"][1]["prob"] for r in result[:2]], abs=1e-6)
    assert rows[2]["label_1"] == "" and "cannot read image" in rows[2]["error"] and rows[0]["error"] == ""
    capsys.readouterr()
    assert main(["predict", str(ema_run[0]), str(folder), "--csv", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["predict", str(ema_run[0]), str(folder), "--csv", str(folder / "a.png")]) == 2
    assert "is one of the files it reads" in capsys.readouterr().err
    assert (folder / "a.png").read_bytes()[:4] == b"\x89PNG"
    for own in ("model.safetensors", "predictions.csv", "run.json"):  # nor the run's own files (a weights file)
        before = (ema_run[0] / own).read_bytes()
        assert main(["predict", str(ema_run[0]), str(folder), "--csv", str(ema_run[0] / own)]) == 2
        assert "is one of the run's own files" in capsys.readouterr().err
        assert (ema_run[0] / own).read_bytes() == before
    # one image alone that cannot be read: its error is the answer, as before
    assert main(["predict", str(ema_run[0]), str(broken)]) == 2
    assert main(["predict", str(ema_run[0]), str(tmp_path / "empty")]) == 2  # neither a file nor a folder
    (tmp_path / "void").mkdir()
    assert main(["predict", str(ema_run[0]), str(tmp_path / "void")]) == 2
    assert "is a folder without image files" in capsys.readouterr().err


def test_predict_says_when_a_run_has_not_finished(ema_run, tmp_path, capsys):
    import json
    import shutil

    from PIL import Image

    copy = tmp_path / "unfinished"
    shutil.copytree(ema_run[0], copy)
    meta = json.loads((copy / "run.json").read_text())
    meta.pop("calibration", None)
    (copy / "run.json").write_text(json.dumps(meta | {"status": "interrupted", "epochs_done": 1}))
    (copy / "metrics.json").unlink()
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    capsys.readouterr()
    assert main(["predict", str(copy), str(image)]) == 0
    assert capsys.readouterr().err.strip() == (f"cifarlens: warning: {copy} was interrupted after 1 epoch(s): these "
                                               "are its weights so far, without a test evaluation or a fitted "
                                               "temperature")
    # evaluate says it too, and afterwards the run lacks no test evaluation any more
    assert main(["evaluate", str(copy)]) == 0
    assert f"warning: {copy} was interrupted after 1 epoch(s)" in capsys.readouterr().err
    assert main(["predict", str(copy), str(image)]) == 0
    assert capsys.readouterr().err.strip().endswith("these are its weights so far, without a fitted temperature")
    assert main(["predict", str(ema_run[0]), str(image)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_resuming_with_another_number_of_processes_says_so(tmp_path):
    """A 2-process run resumed without --nproc went on with one process, silently."""
    data = make_fashion_mnist(tmp_path / "data", n_train=200, n_test=40)
    out = tmp_path / "run"
    cfg = merge(RunConfig(), {
        "data": {"dataset": "fashion-mnist", "data_dir": str(data.data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 32, "epochs": 2},
    })

    def stop(state, model):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, on_epoch_end=stop, report=False)
    env = json.loads((out / "environment.json").read_text())
    (out / "environment.json").write_text(json.dumps(env | {"world_size": 2}))  # as a --nproc 2 run writes it
    assert main(["train", "--resume", str(out)]) == 0
    log = (out / "train.log").read_text()
    assert (f"warning: {out} trained on 2 process(es) and goes on with 1: the global batch is the same, but the "
            "result will differ from an uninterrupted run (resume with --nproc 2 to match it)") in log
    from cifarlens.resume import world_size_note
    from cifarlens.runs import RunDir

    (out / "environment.json").write_text(json.dumps(env | {"world_size": 1}))  # the other way round
    assert world_size_note(RunDir(out), 2).endswith("(resume without --nproc to match it)")  # was "with without"


def test_activation_memory_per_image_is_what_autograd_keeps():
    from torch import nn

    from cifarlens.device import activation_bytes_per_image

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
    # the convolution keeps its input (1x10x10 floats), the ReLU its output (8x10x10): 400 + 3,200 bytes
    assert activation_bytes_per_image(model, (1, 10, 10), torch.device("cpu")) == 3600
    assert model.training  # its mode as it was


def test_a_batch_too_big_for_memory_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import cifarlens.device

    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1", "--no-report",
            "--out", str(out), "--model", "fastnet_cpu"]
    assert cifarlens.device.available_memory() > 2**20  # the real figure, on Linux
    # a machine with 8 MiB left: 90 training images of fastnet_cpu at 28x28 keep about 42 MiB for the backward pass
    monkeypatch.setattr(cifarlens.device, "available_memory", lambda: 8 * 2**20)
    assert main([*args, "--batch-size", "100000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a training batch of 90 images needs at least" in err[0], err
    assert "lower --batch-size (to at most 17 here)" in err[0]
    assert not out.exists()  # refused before the run folder
    assert main([*args, "--batch-size", "16"]) == 0  # over half of it: a warning
    assert "GiB available: it may run out of memory (lower --batch-size)" in (out / "train.log").read_text()
    assert main([*args, "--batch-size", "8", "--force"]) == 0
    assert "run out of memory" not in (out / "train.log").read_text()


def test_running_out_of_memory_mid_training_is_one_line_and_recorded(tmp_path, monkeypatch, capsys):
    import cifarlens.api

    def fit(*args, **kwargs):
        torch.empty(2**50)  # what the CPU allocator raises when it cannot have the memory

    monkeypatch.setattr(cifarlens.api, "fit", fit)
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--no-report", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cifarlens: error: out of memory on cpu while training with batch size 32 (asking for "
                   "4194304.0 GiB more): lower --batch-size"], err
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert "failed (0 epoch(s) finished): out of memory" in (out / "train.log").read_text()


def test_data_given_from_python_for_another_dataset_is_refused(tmp_path):
    """train(cfg, out, bundle=...) trained on the bundle and recorded cfg.data's dataset: evaluate then
    read other data than the run had trained on."""
    from cifarlens.data.pipeline import prepare_data
    from cifarlens.errors import CifarlensError

    fashion = make_fashion_mnist(tmp_path / "fashion", n_train=100, n_test=20)
    cifar = make_cifar10(tmp_path / "cifar", n_train_per_batch=4, n_test=10)
    cfg = merge(RunConfig(), {"data": {"dataset": "cifar10", "data_dir": str(cifar.data_dir), "download": False}})
    bundle = prepare_data(merge(RunConfig(), {"data": {"dataset": "fashion-mnist", "data_dir": str(fashion.data_dir),
                                                       "download": False}}).data, seed=0)
    with pytest.raises(CifarlensError, match="the data given \\(bundle=\\) is fashion-mnist, but cfg.data.dataset is "
                                             "cifar10"):
        train(cfg, tmp_path / "run", bundle=bundle, report=False)
    assert not (tmp_path / "run").exists()


def test_training_gives_the_callers_random_state_back(tmp_path):
    """train() seeded the global RNG for its epochs and left it so: a notebook's later draws were the same in
    every session."""
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--no-report", "--out", str(tmp_path / "run"), *TINY]) == 0
    assert torch.equal(torch.rand(3), expected)


def test_an_export_made_while_the_run_trained_is_removed_when_it_ends(tmp_path):
    """It stayed beside the finished run's weights: the epoch it was made at, uncalibrated."""
    from cifarlens.export import export_safetensors

    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    cfg = merge(RunConfig(), {"data": {"dataset": "fashion-mnist", "data_dir": str(data.data_dir), "download": False},
                              "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
                              "train": {"epochs": 2, "batch_size": 32}})
    out = tmp_path / "run"

    def export_meanwhile(state, model):  # as `cifarlens export RUN` from another terminal
        if state.epoch == 1:
            export_safetensors(out)
            assert (out / "export" / "model.safetensors").is_file()

    train(cfg, out, on_epoch_end=export_meanwhile, report=False)
    assert not (out / "export").exists()
    assert "removed export, exported while the run trained" in (out / "train.log").read_text()


def test_a_stop_just_after_the_checkpoint_was_renamed_records_its_epoch(tmp_path, monkeypatch, capsys):
    """run.json said one epoch fewer than last.pt held (and --resume went on from last.pt's)."""
    import os as os_module

    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    real = os_module.replace

    def replace_then_ctrl_c(src, dst):
        real(src, dst)
        if str(dst).endswith("last.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os_module, "replace", replace_then_ctrl_c)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "3",
                 "--no-report", "--out", str(out), *TINY]) == 130
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["epochs_done"] == 1


def test_a_run_that_diverged_in_its_first_epoch_is_not_said_to_have_weights(stopped_run, capsys):
    """evaluate warned "diverged after 0 epoch(s): these are its weights so far", then said it had none."""
    out, _ = stopped_run
    meta = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**meta, "status": "diverged", "epochs_done": 0}))
    (out / "model.safetensors").unlink()
    (out / "checkpoints" / "last.pt").unlink()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no trained weights yet" in err and "weights so far" not in err and len(err.splitlines()) == 1, err


def test_the_python_api_names_a_wrong_argument_type_in_one_line(finished_run, tmp_path):
    """A notebook's mistakes gave tracebacks from deep inside: train({...}, out) an AttributeError,
    evaluate_run(load_run(...)) a TypeError (it now takes the loaded run), load_exported(None) one."""
    import cifarlens
    from cifarlens.export import load_exported

    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)  # evaluate_run writes its figures: into a copy
    for cfg in ({"train": {"epochs": 1}}, "config.yaml", None):
        with pytest.raises(CifarlensError, match=f"train\\(cfg, out\\): cfg is a RunConfig .*; got {type(cfg).__name__}"):
            cifarlens.train(cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    run = cifarlens.load_run(out)
    assert cifarlens.evaluate_run(run, device="cpu")["accuracy"] == cifarlens.evaluate_run(out, device="cpu")["accuracy"]
    with pytest.raises(CifarlensError, match="a run folder is a path .* or a loaded run; got int"):
        cifarlens.evaluate_run(3)
    with pytest.raises(CifarlensError, match="load_exported\\(path\\): the .safetensors file's path; got NoneType"):
        load_exported(None)


def test_a_run_on_official_files_whose_folder_moved_says_to_pass_data_dir(tmp_path, capsys):
    """evaluate said "CIFAR-10 not found: ... or, for a new run, leave out --no-download": a train flag,
    not --data-dir, which is what it takes."""
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--no-download", "--epochs",
                 "1", "--no-report", "--out", str(out), *TINY]) == 0
    moved = tmp_path / "moved"
    data.data_dir.rename(moved)
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert f"the data of {out} is not in {data.data_dir} any more (moved or deleted?); pass --data-dir" in \
        capsys.readouterr().err
    assert main(["evaluate", str(out), "--data-dir", str(moved)]) == 0


def test_a_run_whose_config_carves_another_validation_split_is_refused(finished_run, tmp_path, capsys):
    """config.yaml's train.seed edited after training: calibrate refitted the temperature, and
    evaluate --split val measured (and wrote over the run's val files), on a split made mostly of
    images the run trained on."""
    import shutil

    source, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert main(["evaluate", str(run), "--split", "val"]) == 0  # as trained: fine
    config = run / "config.yaml"
    assert "\n  seed: 0\n" in config.read_text()
    config.write_text(config.read_text().replace("\n  seed: 0\n", "\n  seed: 5\n"))
    capsys.readouterr()
    for command in (["evaluate", str(run), "--split", "val"], ["calibrate", str(run)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"the validation split is not the one {run} was trained with" in err and "train.seed" in err, err
    assert main(["evaluate", str(run)]) == 0  # the test split does not depend on it


def test_a_recipe_given_beside_a_config_file_that_sets_its_values_is_warned_about(finished_run, tmp_path):
    """`train --config RUN/config.yaml --recipe reference` trained the saved run's fast_cpu settings
    (lr 0.8, sgd, onecycle) under the name reference, without a word."""
    from cifarlens.cli import build_parser
    from cifarlens.config_flags import config_from_args

    out, _ = finished_run
    saved = out / "config.yaml"
    args = build_parser().parse_args(["train", "--config", str(saved), "--recipe", "reference"])
    with pytest.warns(UserWarning, match=rf"--recipe reference: {re.escape(str(saved))} sets \d+ of its settings "
                                         r"otherwise \(.*train\.lr.*\), and the file's win"):
        cfg = config_from_args(args, resolve=False)
    assert cfg.train.recipe == "reference" and cfg.train.lr != 1e-3  # the precedence, as documented
    plain = tmp_path / "plain.yaml"
    plain.write_text("train:\n  epochs: 3\n  lr: 0.01\n")  # a file of no other recipe: its values, nothing said
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_args(build_parser().parse_args(["train", "--config", str(plain), "--recipe", "reference"]),
                         resolve=False)
