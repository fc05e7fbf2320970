"""``cifarlens tune``: Optuna studies on synthetic data, shared storages, search-space files, bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY, make_fashion_mnist
from optuna.trial import TrialState

from cifarlens.api import train
from cifarlens.cli import main
from cifarlens.config import RunConfig, load_yaml, merge
from cifarlens.errors import CifarlensError
from cifarlens.recipes import resolve_choices
from cifarlens.tune import (
    default_space,
    load_space,
    open_storage,
    open_study,
    parse_space,
    run_tune,
)
from cifarlens.tune.search import HOST, base_identity

REPO = Path(__file__).resolve().parents[1]

# A small space: a conditional learning rate wide enough to hold clearly bad values (the
# median pruner stops those after their first epoch) and a list-valued model option.
SPACE = """\
train.optimizer: {choices: [sgd, adam]}
train.lr:
  - {float: [1.0e-5, 0.3], log: true, when: {train.optimizer: sgd}}
  - {float: [1.0e-5, 1.0e-2], log: true, when: {train.optimizer: adam}}
model.kwargs.widths: {choices: [[8, 16], [12, 24]]}
"""
SEED = "0"  # sampler seed for the tiny study; with it, trials are both pruned and completed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fm") / "data", n_train=200, n_test=40).data_dir


def base_args(data_dir: Path, epochs: int = 2) -> list[str]:
    return ["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--no-download", *TINY,
            "--epochs", str(epochs)]


def base_cfg(data_dir: Path, epochs: int = 1, **train) -> RunConfig:
    return merge(RunConfig(), {
        "data": {"dataset": "fashion-mnist", "data_dir": str(data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
        "train": {"batch_size": 32, "epochs": epochs, **train},
    })


def write_space(path: Path, text: str = SPACE) -> Path:
    path.write_text(text)
    return path


def load(out: Path, name: str | None = None) -> optuna.Study:
    storage = f"sqlite:///{out / 'study.db'}"
    return optuna.load_study(study_name=name or optuna.get_all_study_names(storage)[0], storage=storage)


def cli(*args: str) -> subprocess.Popen:
    # one CPU thread each: two processes of all-cores thread pools on two cores wait for each other
    return subprocess.Popen([sys.executable, "-m", "cifarlens.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, data_dir):
    """Five trials of two epochs with the median pruner judging from the first completed trial."""
    root = tmp_path_factory.mktemp("study")
    out = root / "out"
    space = write_space(root / "space.yaml")
    assert main(["tune", *base_args(data_dir), "--space", str(space), "--trials", "5", "--pruner-startup", "1",
                 "--sampler-seed", SEED, "--out", str(out)]) == 0
    return out, load(out)


def test_a_tiny_study_prunes_some_trials_and_completes_others(tiny_study):
    out, study = tiny_study
    states = [t.state for t in study.trials]
    assert [t.number for t in study.trials] == list(range(5))
    assert states.count(TrialState.PRUNED) >= 1 and states.count(TrialState.COMPLETE) >= 2, states
    assert study.user_attrs["cifarlens.space"] == load_space(out / "space.yaml").to_dict()
    for t in study.trials:
        run = Path(t.user_attrs["run_dir"])
        assert run == (out / "trials" / f"{t.number:04d}").absolute()
        meta = json.loads((run / "run.json").read_text())
        assert meta["status"] == ("pruned" if t.state == TrialState.PRUNED else "finished")
        assert set(t.intermediate_values) == set(range(1, t.user_attrs["epochs"] + 1))
        if t.state == TrialState.PRUNED:  # never after its last epoch, where pruning saves nothing
            assert t.user_attrs["epochs"] < 2
        cfg = load_yaml(run / "config.yaml")  # the trial trained what was sampled
        key = "train.lr[train.optimizer=sgd]" if t.params["train.optimizer"] == "sgd" else \
            "train.lr[train.optimizer=adam]"
        assert cfg["train"]["lr"] == t.params[key] and cfg["train"]["optimizer"] == t.params["train.optimizer"]
        assert cfg["model"]["kwargs"]["widths"] == json.loads(t.params["model.kwargs.widths"])
        assert cfg["model"]["kwargs"]["depths"] == [1, 1]
        if t.state == TrialState.COMPLETE:  # value: val_acc of the kept (best val_loss) epoch
            history = list(csv.DictReader((run / "history.csv").open()))
            assert t.value == float(history[meta["best_epoch"] - 1]["val_acc"])
            assert t.user_attrs["val_loss"] == meta["best_val_loss"]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == list(range(5))
    assert {r["state"] for r in rows} == {"COMPLETE", "PRUNED"}
    for row in rows:  # a pruned trial's note says why
        assert bool(re.fullmatch(r"val_acc [\d.]+% after epoch 1 is below the \w+ pruner's bar", row["note"])) \
            == (row["state"] == "PRUNED"), row
    for name in ("best.yaml", "history.png", "importances.png", "summary.json", "space.yaml", "base.yaml"):
        assert (out / name).is_file(), name


def test_the_search_never_evaluates_or_even_holds_the_test_split(tiny_study):
    _, study = tiny_study
    for t in study.trials:
        run = Path(t.user_attrs["run_dir"])
        assert not (run / "metrics.json").exists() and not (run / "predictions.csv").exists()
        assert json.loads((run / "run.json").read_text())["split_sizes"]["test"] == 0  # dropped before training


def test_best_yaml_retrains_to_the_same_validation_accuracy(tiny_study, tmp_path):
    out, study = tiny_study
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["number"] == best.number
    cfg = merge(RunConfig(), load_yaml(out / "best.yaml"))  # what `cifarlens train --config` does
    train(cfg, tmp_path / "again", evaluate_test=False, report=False)
    meta = json.loads((tmp_path / "again" / "run.json").read_text())
    history = list(csv.DictReader((tmp_path / "again" / "history.csv").open()))
    assert float(history[meta["best_epoch"] - 1]["val_acc"]) == best.value
    assert meta["best_val_loss"] == best.user_attrs["val_loss"]


@pytest.mark.slow  # two worker processes, ~7 s; CI runs it with the slow set
def test_two_worker_processes_finish_one_study_between_them(data_dir, tmp_path):
    out = tmp_path / "out"
    space = write_space(tmp_path / "space.yaml")
    args = ["tune", *base_args(data_dir, epochs=1), "--space", str(space), "--trials", "4", "--out", str(out),
            "--storage", f"sqlite:///{tmp_path / 'shared.db'}", "--study", "shared"]
    workers = [cli(*args, "--sampler-seed", str(i)) for i in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    trials = study.trials
    assert [t.number for t in trials] == list(range(4))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both worked
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{n:04d}" for n in range(4)]
    for t in trials:  # each trial trained once, in its own folder, with its own parameters
        cfg = load_yaml(Path(t.user_attrs["run_dir"]) / "config.yaml")
        assert cfg["train"]["optimizer"] == t.params["train.optimizer"]
        assert sum(f"Trial {t.number} " in log for log in logs) == 1


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's ``postgresql``) listening on a Unix socket only:
    the database that workers on several machines would share."""
    pytest.importorskip("psycopg", reason="needs the psycopg driver (pip install 'psycopg[binary]')")
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        pytest.skip("needs a PostgreSQL server (Debian: apt-get install postgresql)")
    bindir = initdb[-1].parent
    # the server refuses to run as root: then it runs as the postgres user, in a folder it owns
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="cifarlens-pg-"))
    if as_user:
        shutil.chown(root, "postgres")

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(bindir / tool), *args], check=True, capture_output=True, timeout=120)

    try:
        pg("initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres")
        pg("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start",
           "-o", f"-k {root} -p 5432 -c listen_addresses=''")
        pg("createdb", "-h", str(root), "-p", "5432", "-U", "postgres", "cifarlens")
        yield f"postgresql://postgres@/cifarlens?host={root}&port=5432"
    finally:
        if (root / "data" / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # a PostgreSQL cluster and two workers, ~8 s: with the slow set, which CI runs too
def test_workers_on_several_machines_share_a_study_in_postgresql(postgres_url, data_dir, tmp_path, capsys):
    # two "machines": the same command with one database URL, each with its own output folder
    space = write_space(tmp_path / "space.yaml")
    args = ["tune", *base_args(data_dir, epochs=1), "--space", str(space), "--trials", "4",
            "--storage", postgres_url, "--study", "shared"]
    outs = [tmp_path / f"machine{i}" for i in range(2)]
    workers = [cli(*args, "--out", str(out), "--sampler-seed", str(i)) for i, out in enumerate(outs)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.trials
    # no shared lock on a server: the count may overshoot by up to (workers - 1), never fall short
    assert 4 <= len(trials) <= 5 and [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both worked
    for t in trials:  # each trained once, on one machine, with its own parameters
        run = Path(t.user_attrs["run_dir"])
        assert run.parent.parent in outs and run.name == f"{t.number:04d}"
        assert load_yaml(run / "config.yaml")["train"]["optimizer"] == t.params["train.optimizer"]
        assert sum(f"Trial {t.number} " in log for log in logs) == 1
    # the same command again continues the study: it is complete, so nothing is added
    assert main([*args, "--out", str(outs[0])]) == 0
    assert len(optuna.load_study(study_name="shared", storage=postgres_url).trials) == len(trials)
    # another search space under the same study name is refused
    other = write_space(tmp_path / "other.yaml", SPACE.replace("0.3]", "0.5]"))
    args[args.index("--space") + 1] = str(other)
    line = run_cli_error(capsys, [*args, "--out", str(outs[0])])
    assert "different search space (differs in: train.lr)" in line


@pytest.mark.slow  # ~10 s of trials; CI runs it with the slow set (the default suite's 7-minute budget)
def test_rerunning_continues_a_study_and_workers_extend_it(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    space = write_space(tmp_path / "space.yaml")
    args = ["tune", *base_args(data_dir, epochs=1), "--space", str(space), "--out", str(out), "--sampler-seed", "1"]
    assert main([*args, "--trials", "2"]) == 0
    first = [(t.number, t.params, t.value, t.datetime_start) for t in load(out).trials]
    assert len(first) == 2
    assert main([*args, "--trials", "2"]) == 0  # already complete: nothing added
    assert len(load(out).trials) == 2
    assert main([*args, "--trials", "4", "--workers", "2"]) == 0  # one more process on the same storage
    trials = load(out).trials
    assert [t.number for t in trials] == list(range(4))
    assert [(t.number, t.params, t.value, t.datetime_start) for t in trials[:2]] == first
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert (out / "worker-1.log").is_file()
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 4
    capsys.readouterr()
    assert main([*args, "--trials", "3"]) == 0  # a smaller N: nothing added, said so (was "4 of 3 trials finished")
    out_text = capsys.readouterr().out
    assert "4 trials finished (--trials 3 adds none)" in out_text and "each trial trains 1 epoch of" in out_text


def test_a_dead_workers_running_trial_is_failed_and_replaced(data_dir, tmp_path):
    cfg, out = base_cfg(data_dir), tmp_path / "out"
    space = parse_space(yaml.safe_load(SPACE), "test space")
    run_tune(cfg, out, trials=1, space=space, sampler_seed=0)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    study = load(out)
    orphan = study.ask()  # a trial whose worker was killed: RUNNING forever without this check
    orphan.set_user_attr("host", HOST)
    orphan.set_user_attr("pid", int(gone.stdout))
    summary = run_tune(cfg, out, trials=2, space=space, sampler_seed=0)
    states = [t.state for t in load(out).trials]
    assert states[1] == TrialState.FAIL and states[2] in (TrialState.COMPLETE, TrialState.PRUNED)
    assert summary["trials"]["FAIL"] == 1


def test_a_worker_that_died_unwaited_counts_as_gone():
    """A worker process this one started stays a zombie until waited for; os.kill(pid, 0) still
    succeeds on it, so its trial was taken for running until the session ended."""
    from cifarlens.tune.study import process_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while process_alive(child.pid):
            assert time.monotonic() < deadline, "a finished, unwaited child still counts as alive"
            time.sleep(0.05)
    finally:
        child.wait()
    assert process_alive(os.getppid())  # a live process is alive


def test_a_storage_lost_mid_study_is_recognised_behind_optunas_own_errors():
    """PostgreSQL stopped mid-study: psycopg's error, wrapped by Optuna, then an UnboundLocalError
    raised while Optuna handled it; the CLI turns it into one line."""
    import sqlalchemy

    from cifarlens.tune.cli import _storage_failure

    def optuna_losing_its_database():
        try:
            try:
                raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("server closed the connection"))
            except sqlalchemy.exc.OperationalError as err:
                raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from err
        except optuna.exceptions.StorageInternalError:
            raise UnboundLocalError("cannot access local variable 'updated_state'")

    with pytest.raises(UnboundLocalError) as caught:
        optuna_losing_its_database()
    assert _storage_failure(caught.value) == "server closed the connection"
    assert _storage_failure(ValueError("a bug")) is None


def test_a_time_budget_is_refused_by_tune(data_dir, tmp_path, capsys):
    """Each trial timed and planned its own epochs, while the banner said they all trained the same."""
    line = run_cli_error(capsys, ["tune", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--no-download",
                                  *TINY, "--time-budget", "20s", "--out", str(tmp_path / "o")])
    assert "drop --time-budget" in line and not (tmp_path / "o").exists()


def test_a_diverging_trial_is_pruned_with_its_reason(data_dir, tmp_path):
    space = parse_space({"train.lr": {"choices": [1.0e30]}}, "test space")
    summary = run_tune(base_cfg(data_dir), tmp_path / "out", trials=1, space=space)
    (trial,) = load(tmp_path / "out").trials
    assert trial.state == TrialState.PRUNED and "became" in trial.user_attrs["pruned_reason"]
    assert json.loads((Path(trial.user_attrs["run_dir"]) / "run.json").read_text())["status"] == "diverged"
    assert summary["best"] is None and not (tmp_path / "out" / "best.yaml").exists()


def test_ctrl_c_in_a_trial_stops_the_worker_without_a_nan_warning(data_dir, tmp_path, monkeypatch, capsys, caplog):
    """Optuna records the interrupted trial as FAIL from a NaN value; its warning about that NaN
    read like a diverged loss, so it is not shown; the trial is named as interrupted instead."""
    import cifarlens.api as api

    def interrupted(*args, **kwargs):  # Ctrl-C during the trial's training
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "train", interrupted)
    level = optuna.logging.get_verbosity()
    optuna.logging.enable_propagation()  # Optuna's own handler writes to the stderr of its import time
    try:
        with pytest.raises(KeyboardInterrupt):
            run_tune(base_cfg(data_dir), tmp_path / "out", trials=2,
                     space=parse_space({"train.lr": {"choices": [0.1]}}, "test space"))
    finally:
        optuna.logging.disable_propagation()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("optuna") and r.levelname == "WARNING"]
    assert "trial 0 interrupted: recorded as failed" in capsys.readouterr().out
    (trial,) = load(tmp_path / "out").trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["error"] == "interrupted"
    assert optuna.logging.get_verbosity() == level  # restored


def test_trials_that_keep_failing_stop_the_worker_with_the_reason(data_dir, tmp_path, capsys):
    """A sampled dataset that cannot be read printed Optuna's traceback and ended the study at the first
    trial, the reason unrecorded. (Values the model refuses are refused before any trial: BAD_SPACES.)"""
    space = parse_space({"data.dataset": {"choices": ["cifar10"]}}, "test space")
    base = base_cfg(data_dir)  # no download: the data folder holds Fashion-MNIST only
    with pytest.raises(CifarlensError, match="3 trials in a row failed; the last: trial 2: CIFAR-10 not found"):
        run_tune(base, tmp_path / "out", trials=5, space=space)
    trials = load(tmp_path / "out").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all("CIFAR-10 not found" in t.user_attrs["error"] for t in trials)
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any training
# ---------------------------------------------------------------------------


def run_cli_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("cifarlens: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("storage, message", [
    ("postgresql://user:secret@127.0.0.1:1/x", "storage postgresql://user:***@127.0.0.1:1/x"),
    ("sqlite:///{tmp}/missing/folder/study.db", "does not exist"),
    ("sqlite:///{tmp}", "is a folder"),
    ("journal:{tmp}/missing/study.log", "does not exist"),
    ("sqlite://", "in-memory"),
    ("nosuchdb://host/x", "unknown database type"),
    ("just words", "is not a URL"),
])
def test_bad_storages_are_one_clear_error(storage, message, data_dir, tmp_path, capsys):
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--storage", storage.format(tmp=tmp_path),
                                  "--out", str(tmp_path / "out"), "--trials", "1"])
    assert message in line and "secret" not in line


BAD_SPACES = {
    "unknown form": ("train.lr: {uniform: [0.01, 0.1]}", "train.lr: unknown option 'uniform'"),
    "low >= high": ("train.lr: {float: [0.1, 0.01]}", "train.lr: low (0.1) must be below high (0.01)"),
    "log with low <= 0": ("train.weight_decay: {float: [0, 0.1], log: true}", "a log range needs low > 0"),
    "empty choices": ("train.batch_size: {choices: []}", "choices must be a non-empty list"),
    "unknown key": ("train.learning_rate: {float: [0.01, 0.1]}", "train.learning_rate: not a config key"),
    "when before definition": (("train.lr: {float: [0.01, 0.1], when: {train.optimizer: sgd}}\n"
                                "train.optimizer: {choices: [sgd, adam]}"), "not defined earlier"),
    "when never true": (("train.optimizer: {choices: [sgd, adam]}\n"
                         "train.lr: {float: [0.01, 0.1], when: {train.optimizer: lion}}"), "can never hold"),
    "alternatives without when": ("train.lr:\n  - {float: [0.01, 0.1]}\n  - {float: [0.1, 1.0]}",
                                  "each needs a when"),
    "wrong type": ("train.batch_size: {float: [16, 64]}", "train.batch_size = 16.0: config key"),
    "refused by the recipe check": ("train.lr: {float: [0.0, 0.1]}", "train.lr must be > 0"),
    "unknown recipe": ("train.recipe: {choices: [fast, turbo]}", "unknown recipe 'turbo'"),
    "unknown augmentation": ("data.augment: {choices: [flip, heavy]}", "unknown augmentation level 'heavy'"),
    "option the model lacks": ("model.kwargs.bn_momentum: {float: [0.1, 0.9]}", "has no option 'bn_momentum'"),
    "not a mapping": ("- train.lr", "must be a non-empty mapping"),
    "invalid YAML": ("train.lr: {float: [0.01", "is not valid YAML"),
    "a zero validation split": ("data.val_fraction: {choices: [0.1, 0.0]}", "data.val_fraction must stay above 0"),
    "an infinite bound": ("train.warmup_epochs: {float: [0, .inf]}", "is not a finite number"),
    # refused before any trial (each was 3 failed trials, and the study then tied to the space)
    "a value the model refuses": ("model.kwargs.widths: {choices: [[8, 16], [0, 0]]}",
                                  "widths must be a non-empty list of positive integers, got [0, 0]"),
    "a time budget": ("train.time_budget: {float: [10, 60]}", "not a setting to tune: trials are compared after"),
    "a machine's setting": ("train.device: {choices: [cpu]}", "not a setting to tune: it describes this machine"),
    "a key given twice": ("train.lr: {float: [0.01, 0.1]}\ntrain.lr: {float: [0.1, 0.5]}", "'train.lr' is given twice"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_invalid_search_space_files_are_refused_naming_file_and_key(case, data_dir, tmp_path, capsys):
    text, message = BAD_SPACES[case]
    space = write_space(tmp_path / "bad_space.yaml", text + "\n")
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--space", str(space), "--out", str(tmp_path / "o")])
    assert str(space) in line and message in line
    assert not (tmp_path / "o").exists()  # refused before a study or a folder exists


def test_a_base_model_that_train_would_refuse_is_refused_before_any_trial(data_dir, tmp_path, capsys):
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--set", "model.kwargs={widths: [0, 0], depths: [1, 1]}",
                                  "--out", str(tmp_path / "o")])
    assert "widths must be a non-empty list of positive integers" in line and not (tmp_path / "o").exists()


def test_continuing_a_study_kept_elsewhere_without_its_storage_names_it(data_dir, tmp_path, capsys, monkeypatch):
    """It said the trials/ folder held "an earlier study" and left an empty study.db behind. A relative
    storage path is kept absolute, so the hint holds from any folder."""
    out, journal = tmp_path / "o", tmp_path / "study.log"
    args = ["tune", *base_args(data_dir, epochs=1), "--trials", "1", "--out", str(out)]
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--storage", "journal:study.log"]) == 0
    monkeypatch.chdir(out)
    line = run_cli_error(capsys, args)
    assert f"holds a study kept in storage journal:{journal} (its tune.json): pass --storage journal:{journal}" in line
    assert not (out / "study.db").exists()


def test_a_study_is_not_made_in_a_run_folder_or_a_file(data_dir, tmp_path, capsys):
    """Its study.db and base.yaml went into the run, and every trial was then refused as inside it."""
    run = tmp_path / "run"
    assert main(["train", *base_args(data_dir, epochs=1), "--no-report", "--out", str(run)]) == 0
    before = sorted(p.name for p in run.iterdir())
    for out, words in ((run, "is the run folder"), (run / "sub", "is inside the run folder"),
                       (run / "metrics.json", "is a file")):
        assert words in run_cli_error(capsys, ["tune", *base_args(data_dir), "--out", str(out)])
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_study_continued_on_other_images_is_refused_and_on_a_copy_goes_on(data_dir, tmp_path, capsys):
    """A study continued with --data-dir on other classes ranked their trials with the first ones'."""
    out = tmp_path / "o"
    assert main(["tune", *base_args(data_dir, epochs=1), "--trials", "1", "--out", str(out)]) == 0
    other = make_fashion_mnist(tmp_path / "other", n_train=200, n_test=40, seed=1).data_dir
    line = run_cli_error(capsys, ["tune", *base_args(other, epochs=1), "--trials", "2", "--out", str(out)])
    assert f"was run on other images than {other} holds now" in line
    copy = shutil.copytree(data_dir, tmp_path / "copy")  # the same images elsewhere (another machine's path)
    assert main(["tune", *base_args(copy, epochs=1), "--trials", "2", "--out", str(out)]) == 0
    assert len(load(out).trials) == 2
    missing = run_cli_error(capsys, ["tune", *base_args(tmp_path / "none", epochs=1), "--trials", "3",
                                     "--out", str(tmp_path / "o2")])
    assert "not found" in missing and not (tmp_path / "o2").exists()  # the data is read before the study exists


@pytest.mark.slow  # ~5 s; CI runs it with the slow set
def test_a_study_name_clash_with_another_space_or_base_config_is_refused(data_dir, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # resolved as the Tuner resolves its base (a model and recipe left unset are fixed for the study)
    space, cfg = parse_space(yaml.safe_load(SPACE), "a"), resolve_choices(base_cfg(data_dir, epochs=2), "cpu")[0]
    open_study(open_storage(url), "mine", space, cfg)
    other = write_space(tmp_path / "other.yaml", SPACE.replace("0.3]", "0.5]"))
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--storage", url, "--study", "mine",
                                  "--space", str(other), "--out", str(tmp_path / "o1")])
    assert "study mine in" in line and "different search space (differs in: train.lr)" in line
    assert "use another --out (or --study name in a shared --storage), or the same --space" in line
    same = write_space(tmp_path / "same.yaml")
    line = run_cli_error(capsys, ["tune", *base_args(data_dir, epochs=3), "--storage", url, "--study", "mine",
                                  "--space", str(same), "--out", str(tmp_path / "o2")])
    assert "different base config (differs in: train.epochs)" in line
    proc = subprocess.run([sys.executable, "-m", "cifarlens.cli", "tune", *base_args(data_dir, epochs=3), "--storage",
                           url, "--study", "mine", "--space", str(same), "--out", str(tmp_path / "o3")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == line, proc.stderr  # no "Using an existing study" before it
    # where the data sits and which device trains may differ between machines
    moved = merge(cfg, {"data": {"data_dir": "/elsewhere"}, "train": {"device": "cpu", "cpu_amp": True}})
    assert base_identity(moved) == base_identity(cfg)
    open_study(open_storage(url), "mine", space, moved)


# ---------------------------------------------------------------------------
# Search spaces
# ---------------------------------------------------------------------------


def test_the_default_space_tunes_only_options_the_model_accepts():
    def keys(model, **kwargs):
        return default_space(merge(RunConfig(), {"model": {"name": model, "kwargs": kwargs}})).config_keys()

    common = {"train.recipe", "train.optimizer", "train.lr", "train.weight_decay", "train.label_smoothing",
              "train.batch_size", "data.augment"}
    assert set(keys("lensnet_light")) == common | {"model.kwargs.dropout", "model.kwargs.widths",
                                                   "model.kwargs.depths"}
    assert set(keys("fastnet_cpu")) == common | {"model.kwargs.widths"}
    assert set(keys("resnet20")) == common
    tiny = default_space(merge(RunConfig(), {"model": {"name": "lensnet_light",
                                                       "kwargs": {"widths": [8, 16], "depths": [1, 1]}}}))
    assert tiny.param("model.kwargs.widths").choices == ([4, 8], [8, 16], [16, 32])  # around the base's widths
    assert tiny.param("model.kwargs.depths").choices == ([1, 1], [2, 2])


def test_the_documented_space_file_is_the_default_for_lensnet_light(capsys):
    cfg = merge(RunConfig(), {"model": {"name": "lensnet_light"}})
    assert load_space(REPO / "configs" / "tune" / "space.yaml").params == default_space(cfg).params
    assert main(["tune", "--model", "lensnet_light", "--print-space"]) == 0
    assert parse_space(yaml.safe_load(capsys.readouterr().out)).params == default_space(cfg).params


def test_conditional_entries_are_sampled_only_when_their_condition_holds():
    space = parse_space(yaml.safe_load(SPACE), "test space")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = space.sample(trial)
        optimizer, lr = values["train.optimizer"], values["train.lr"]
        assert set(trial.params) == {"train.optimizer", f"train.lr[train.optimizer={optimizer}]",
                                     "model.kwargs.widths"}
        assert 1e-5 <= lr <= (0.3 if optimizer == "sgd" else 1e-2)
        assert values["model.kwargs.widths"] in ([8, 16], [12, 24])  # decoded from Optuna's string
        assert space.values_of(trial.params) == values
        cfg = space.apply(base_cfg(Path("data")), values)
        assert cfg.model.kwargs == {"widths": values["model.kwargs.widths"], "depths": [1, 1]}
        seen.add(optimizer)
        study.tell(trial, 0.0)
    assert seen == {"sgd", "adam"}
    assert parse_space(yaml.safe_load(space.to_yaml())).params == space.params  # the file form round-trips


@pytest.mark.parametrize("mask, mode", [(0o002, 0o664), (0o077, 0o600)])
def test_the_sqlite_study_file_follows_the_umask(tmp_path, mask, mode):
    """SQLite makes its file 0644 whatever the umask: a group-shared study was not group-writable."""
    old = os.umask(mask)
    try:
        open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    finally:
        os.umask(old)
    assert (tmp_path / "study.db").stat().st_mode & 0o777 == mode


def test_sigterm_ends_tune_with_143_as_train_does(data_dir, tmp_path, monkeypatch, capsys):
    """Job schedulers read 143 as "stopped by SIGTERM"; tune said 130 (Ctrl-C) and "interrupted"."""
    from cifarlens.errors import Terminated
    from cifarlens.tune.search import Tuner

    def stopped(self):
        raise Terminated()

    monkeypatch.setattr(Tuner, "work", stopped)
    assert main(["tune", *base_args(data_dir), "--trials", "1", "--out", str(tmp_path / "o")]) == 143
    assert capsys.readouterr().err.startswith("cifarlens: terminated; run the same command again to continue study")


def test_sigterm_during_a_trial_ends_tune_with_143(data_dir, tmp_path, monkeypatch, capsys):
    """The trial's Terminated was re-raised as a plain KeyboardInterrupt: 130, "interrupted"."""
    import cifarlens.api as api
    from cifarlens.errors import Terminated

    def terminated(*args, **kwargs):  # SIGTERM during the trial's training
        raise Terminated()

    monkeypatch.setattr(api, "train", terminated)
    assert main(["tune", *base_args(data_dir), "--trials", "2", "--out", str(tmp_path / "o")]) == 143
    assert "cifarlens: terminated; run the same command again" in capsys.readouterr().err


def test_a_store_of_the_other_library_or_none_is_refused_untouched(data_dir, tmp_path, capsys):
    """Optuna and MLflow add their tables to any SQLite file they are given, then fail on the mix
    (a 60-line traceback); an MLflow database that is a folder was retried for two minutes."""
    import hashlib
    import sqlite3

    def make(path, tables):
        with contextlib.closing(sqlite3.connect(path)) as db:
            for table in tables:
                db.execute(f"CREATE TABLE {table} (x INTEGER)")
            db.commit()
        return hashlib.sha256(path.read_bytes()).hexdigest()

    mlflow_db, optuna_db, notes = tmp_path / "mlflow.db", tmp_path / "o1" / "study.db", tmp_path / "notes.db"
    optuna_db.parent.mkdir()
    files = {mlflow_db: make(mlflow_db, ["experiments", "runs", "metrics", "alembic_version"]),
             optuna_db: make(optuna_db, ["studies", "trials", "version_info"]),
             notes: make(notes, ["studies"])}
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--storage", f"sqlite:///{mlflow_db}",
                                  "--out", str(tmp_path / "o2"), "--trials", "1"])
    assert f"{mlflow_db} holds MLflow's tables (alembic_version, experiments, metrics, runs, ...), not Optuna's" in line
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--out", str(tmp_path / "o3"), "--trials", "1",
                                  "--storage", f"sqlite:///{notes}"])
    assert "holds another program's tables (studies, ...), not Optuna's" in line
    line = run_cli_error(capsys, ["train", *base_args(data_dir), "--out", str(tmp_path / "run"), "--logger", "mlflow",
                                  "--tracking-uri", f"sqlite:///{optuna_db}"])
    assert "holds an Optuna study's tables (studies, trials, version_info, ...), not MLflow's" in line
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files} == files
    for uri, words in ((f"sqlite:///{tmp_path}", "is a folder, not a file"),
                       ("sqlite:////proc/mlflow.db", "cannot create /proc/mlflow.db")):
        line = run_cli_error(capsys, ["train", *base_args(data_dir), "--out", str(tmp_path / "run"),
                                      "--logger", "mlflow", "--tracking-uri", uri])
        assert words in line, line
    # tune checks the trials' tracking before the first trial (each trial failed on it in turn)
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--out", str(tmp_path / "o4"), "--trials", "3",
                                  "--set", "track.loggers=[mlflow]", "--set", f"track.tracking_uri=sqlite:///{tmp_path}"])
    assert "is a folder, not a file" in line and not (tmp_path / "o4" / "trials").exists()
    assert not (tmp_path / "run").exists()


def test_a_refused_study_leaves_no_tune_json_to_refuse_the_corrected_command(data_dir, tmp_path, capsys):
    """tune.json, written before the study was opened, named the refused study: 'holds study mini, not good'."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(study_name="mini", storage=storage)  # minimises: refused
    out = tmp_path / "out"
    args = ["tune", *base_args(data_dir), "--out", str(out), "--trials", "1", "--storage", storage]
    assert "minimises" in run_cli_error(capsys, [*args, "--study", "mini"])
    assert not out.exists()  # (an empty --out was left behind)
    optuna.create_study(study_name="multi", storage=storage, directions=["maximize", "minimize"])  # was a traceback
    assert "has 2 objectives; cifarlens studies have one" in run_cli_error(capsys, [*args, "--study", "multi"])
    assert not out.exists()
    # a tracking URI naming the study's own database: every trial failed on it, after the check had passed
    own = tmp_path / "own"  # its default storage, own/study.db, does not exist before tune makes it
    own.mkdir()
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--out", str(own), "--trials", "1", "--set",
                                  "track.loggers=[mlflow]", "--set", f"track.tracking_uri=sqlite:///{own / 'study.db'}"])
    assert "holds an Optuna study's tables" in line and not (own / "trials").exists()
    assert not (own / "tune.json").exists()
    assert main([*args, "--study", "good", "--sampler-seed", "-5"]) == 2
    assert "--sampler-seed must be >= 0, got -5" in capsys.readouterr().err
    assert main([*args, "--study", "good", "--timeout", "nan"]) == 2
    assert "--timeout must be > 0 seconds, got nan" in capsys.readouterr().err
    assert main([*args, "--study", "good"]) == 0
    assert json.loads((out / "tune.json").read_text())["study"] == "good"


def test_a_storage_optuna_cannot_commit_to_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    """A read-only study database (Optuna wraps SQLite's "attempt to write a readonly database" in its
    StorageInternalError) was a traceback. Read-only files cannot be made here as root: the commit
    failure is raised as Optuna raises it."""
    import sqlalchemy.exc

    def read_only(*args, **kwargs):
        try:
            raise sqlalchemy.exc.OperationalError("INSERT INTO studies", {}, Exception("attempt to write a readonly "
                                                                                      "database"))
        except sqlalchemy.exc.SQLAlchemyError as err:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from err

    monkeypatch.setattr(optuna, "create_study", read_only)
    out = tmp_path / "out"
    line = run_cli_error(capsys, ["tune", *base_args(data_dir), "--out", str(out), "--trials", "1",
                                  "--storage", f"sqlite:///{tmp_path / 'ro.db'}"])
    assert line.endswith(": attempt to write a readonly database") and "cannot use storage" in line
    assert not out.exists()


def test_sigterm_while_waiting_for_the_other_workers_ends_them_too(data_dir, tmp_path, monkeypatch, capsys):
    """The workers outlived a SIGTERM that came while this worker waited for them, untracked."""
    import signal
    import threading

    import cifarlens.tune.cli as tune_cli
    from cifarlens.tune.search import Tuner

    started = []

    def worker(tuner, index, threads):  # a real process that would run on for a minute
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # while this one waits for it
        return started[-1], tmp_path / "worker.log"

    monkeypatch.setattr(Tuner, "work", lambda self: None)  # this worker's trials are done: it waits
    monkeypatch.setattr(tune_cli, "_start_worker", worker)
    assert main(["tune", *base_args(data_dir), "--trials", "2", "--workers", "2", "--out", str(tmp_path / "o")]) == 143
    assert started and started[0].poll() is not None  # ended, and waited for
