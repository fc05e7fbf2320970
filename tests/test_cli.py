"""End-to-end: the ``cifarlens`` command on synthetic data in the official layouts."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import cifarlens
from cifarlens.checkpoint import load_checkpoint
from cifarlens.api import load_run, train
from cifarlens.cli import main
from cifarlens.config import RunConfig, merge
from conftest import TINY, make_fashion_mnist



def cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (to see exit codes and stderr as a user does)."""
    return subprocess.run([sys.executable, "-m", "cifarlens.cli", *args], capture_output=True, text=True, timeout=300)


def interrupted(run: Path) -> None:
    """Mark a copied run as stopped mid-training, as --resume expects of a run to continue."""
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(meta | {"status": "interrupted"}))


TINY_MODELS = {
    "lensnet": {"name": "lensnet_light", "kwargs": {"widths": [8, 16], "depths": [1, 1]}},
    "fastnet": {"name": "fastnet_cpu", "kwargs": {"widths": [8, 16]}},
}


def tiny_cfg(data_dir: Path, model: str = "lensnet", **train) -> RunConfig:
    return merge(RunConfig(), {
        "data": {"dataset": "fashion-mnist", "data_dir": str(data_dir), "download": False},
        "model": TINY_MODELS[model],
        "train": {"batch_size": 32, "epochs": 3, **train},
    })


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
    """One trained run shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("fm")
    data = make_fashion_mnist(root / "data", n_train=400, n_test=100)
    out = root / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "4",
                 "--out", str(out), *TINY]) == 0
    return out, data


def test_train_writes_a_complete_run_folder(fashion_run):
    out, data = fashion_run
    for name in ["config.yaml", "run.json", "environment.json", "history.csv", "train.log", "model.safetensors",
                 "checkpoints/last.pt", "metrics.json", "predictions.csv", "classification_report.txt",
                 "confusion_matrix.png", "curves.png"]:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["split_size"] == 100
    assert metrics["accuracy"] > 0.5  # the synthetic classes are learnable; chance is 0.1
    for key in ["top5_accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "per_class"]:
        assert key in metrics
    assert np.array(metrics["confusion_matrix"]).sum() == 100
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert list(rows[0]) == ["index", "label", "prediction", "confidence", "confidence_uncalibrated"] and len(rows) == 100
    accuracy = np.mean([r["label"] == r["prediction"] for r in rows])
    assert accuracy == pytest.approx(metrics["accuracy"])
    history = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0 and env["device"] == "cpu"
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "finished" and meta["split_sizes"] == {"train": 360, "val": 40, "test": 100}
    assert meta["dataset"]["classes"][0] == "T-shirt/top"


def test_evaluate_reproduces_test_metrics_and_writes_val(fashion_run):
    out, _ = fashion_run
    before = json.loads((out / "metrics.json").read_text())
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == before["accuracy"]
    assert main(["evaluate", str(out), "--split", "val", "--device", "cpu"]) == 0
    val = json.loads((out / "metrics_val.json").read_text())
    assert val["split"] == "val" and val["split_size"] == 40
    assert (out / "confusion_matrix_val.png").is_file()


def test_evaluate_on_a_folder_it_cannot_write_shows_the_figures_and_says_what_was_not_saved(
        fashion_run, monkeypatch, capsys):
    """(Tests run as root, whom a read-only folder does not stop: the writer raises as the
    operating system would.)"""
    import errno

    from cifarlens import evaluation

    out, _ = fashion_run
    before = (out / "metrics_val.json").read_bytes() if (out / "metrics_val.json").exists() else None

    def read_only(path, obj):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(evaluation, "atomic_write_json", read_only)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "val", "--device", "cpu"]) == 2
    printed = capsys.readouterr()
    assert printed.out.startswith("val: accuracy ") and "(40 images)" in printed.out
    assert printed.err.strip() == (f"cifarlens: error: results not saved in {out}: Permission denied: "
                                   f"{out / 'metrics_val.json'}")
    assert ((out / "metrics_val.json").read_bytes() if (out / "metrics_val.json").exists() else None) == before
    # the Python API and train's own evaluation still raise
    with pytest.raises(PermissionError):
        evaluation.evaluate_run(out, split="val", device="cpu")


def test_predict_cli_and_python_api(fashion_run, tmp_path, capsys):
    out, data = fashion_run
    paths = []
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(data.test_images[i, 0]).save(path)
        paths.append(str(path))
    capsys.readouterr()
    assert main(["predict", str(out), *paths, "--json", "--topk", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in result] == paths
    for r in result:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6

    run = cifarlens.load_run(out)
    assert not run.model.training
    # files and the equivalent uint8 tensor give the same probabilities
    from_files = run.predict_proba(paths)
    from_tensor = run.predict_proba(torch.from_numpy(data.test_images[:6]))
    assert torch.allclose(from_files, from_tensor, atol=1e-5)
    assert torch.allclose(from_files.sum(1), torch.ones(6), atol=1e-5)
    assert [p.labels[0] for p in run.predict(paths)] == [r["top"][0]["label"] for r in result]
    assert capsys.readouterr().err == ""
    assert main(["predict", str(out), paths[0], "--json", "--topk", "20"]) == 0  # more than its 10 classes
    printed = capsys.readouterr()
    assert len(json.loads(printed.out)[0]["top"]) == 10
    assert printed.err == "cifarlens: warning: --topk 20 is more than the run's 10 classes: all of them are shown\n"
    assert main(["predict", str(out), paths[0], "--json"]) == 0  # the default: 5
    printed = capsys.readouterr()
    assert len(json.loads(printed.out)[0]["top"]) == 5 and printed.err == ""


def test_the_python_api_takes_what_a_notebook_has_and_refuses_what_it_would_misread(fashion_run, tmp_path):
    """int64 or 0-255 float tensors, or normalised ones, gave confident nonsense; tensors of other sizes
    went unresized; numpy images were refused with the array in the message; predict_proba read one
    path as its characters; all images were one batch (4 GB for 10,000 CIFAR images)."""
    import cifarlens.inference as inference

    out, data = fashion_run
    run = cifarlens.load_run(out)
    grey = data.test_images[:6]  # (6, 1, 28, 28) uint8
    expected = run.predict_proba(torch.from_numpy(grey))
    path = tmp_path / "a.png"
    Image.fromarray(grey[0, 0]).save(path)
    pil = Image.open(path)
    same = [torch.from_numpy(grey).float() / 255, torch.from_numpy(grey[0])]  # float in [0, 1]; one (C, H, W)
    torch.testing.assert_close(run.predict_proba(same[0]), expected)
    for one in (same[1], str(path), path, pil, grey[0, 0], grey[0].transpose(1, 2, 0), path.read_bytes(),
                bytearray(path.read_bytes())):  # each alone: a batch of one
        torch.testing.assert_close(run.predict_proba(one), expected[:1], msg=str(type(one)))
    assert [p.labels for p in run.predict(iter([pil, grey[0, 0]]))] == [run.predict(pil)[0].labels] * 2
    assert run.predict([]) == [] and run.predict_proba([]).shape == (0, 10)
    for bad, words in ((torch.from_numpy(grey).long(), "uint8 (0-255) or float in [0, 1]; got torch.int64"),
                       (torch.from_numpy(grey).float(), "holds pixels / 255, in [0, 1], not normalised; got values in"),
                       (torch.full((1, 1, 28, 28), float("nan")), "got values in [nan, nan]"),
                       (torch.zeros(2, 28, 28, 1, dtype=torch.uint8), "is (B, 1, 28, 28) (B, C, H, W); got (2, 28, 28, 1)"),
                       (torch.zeros(1, 1, 32, 32, dtype=torch.uint8), "got (1, 1, 32, 32) (a tensor is not resized"),
                       (np.zeros((2, 28, 28, 3), np.uint8), "a numpy image must be uint8 (H, W) or (H, W, C)"),
                       (3.5, "got float"), (tmp_path, "is a folder, not an image")):
        with pytest.raises(cifarlens.CifarlensError, match=re.escape(words)):
            run.predict_proba(bad)
    many = torch.from_numpy(np.repeat(grey, 50, axis=0))  # 300 images: two chunks, the same figures
    assert len(many) > inference.PREDICT_CHUNK
    torch.testing.assert_close(run.predict_proba(many), expected.repeat_interleave(50, dim=0))
    assert pil.tell() == 0 and len(run.predict([pil] * 3)) == 3
    assert run.status == "finished" and repr(run).startswith(f"Run({str(out)!r}, model=")
    with pytest.raises(cifarlens.CifarlensError, match="unknown split 'training'; choose train, val or test"):
        run.split("training")  # an AttributeError; "info" gave the DatasetInfo
    for kwargs in ({"device": None}, {"calibrated": "no"}):  # a TypeError from deep inside; "no" calibrated
        with pytest.raises(cifarlens.CifarlensError, match="load_run\\(run_dir: a path, device: a str"):
            cifarlens.load_run(out, **kwargs)


def test_a_run_folder_given_from_python_as_tilde_is_the_home_folders(fashion_run, tmp_path, monkeypatch):
    """cifarlens.train(cfg, "~/runs/x") made a folder named "~" in the working folder (a shell expands ~, Python
    does not), and load_run("~/...") said it was not found."""
    import shutil

    out, _ = fashion_run
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(out, tmp_path / "runs" / "r")
    monkeypatch.chdir(tmp_path)
    assert cifarlens.load_run("~/runs/r").path == tmp_path / "runs" / "r"
    assert not (tmp_path / "~").exists()


def test_compiled_training_learns_what_eager_training_learns_and_saves_plain_weights(tmp_path):
    data = make_fashion_mnist(tmp_path / "data", n_train=200, n_test=50)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    # fp32 both: on a CPU with native bf16, autocast would differ between the fused and eager kernels
    # by far more than the float reordering this test allows for
    train(tiny_cfg(data.data_dir, "fastnet", epochs=2, cpu_amp=False), eager, report=False)
    train(tiny_cfg(data.data_dir, "fastnet", epochs=2, compile=True, cpu_amp=False), compiled,
          report=False)  # torch.compile
    assert yaml.safe_load((compiled / "config.yaml").read_text())["train"]["compile"] is True
    a, b = load_file(eager / "model.safetensors"), load_file(compiled / "model.safetensors")
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes: the weights load into a plain model
    for key in a:  # the compiled kernels fuse and reorder float sums, nothing more
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-3, msg=key)
    assert load_run(compiled).predict(torch.from_numpy(data.test_images[:4]))[0].labels


@pytest.mark.slow  # ~5 s of compiling; CI runs it with the slow set (test_compiled_training covers compile by default)
def test_compiled_progressive_resizing_compiles_every_width_statically_in_the_bench_warm_up(tmp_path, capsys):
    """torch.compile's default turns a width that changes between epochs into symbolic sizes and
    recompiles: on an H200, fast_cpu_10min compiled had not finished its 8 epochs after 3.5 minutes
    (eager: 21 s). With progressive resizing each width gets a static graph, and bench's warm-up
    run trains every width, so that the timed run compiles nothing."""
    import logging

    import torch._dynamo
    from torch._dynamo.utils import counters

    from cifarlens.bench import run_bench

    data = make_fashion_mnist(tmp_path / "data", n_train=200, n_test=50)
    cfg = tiny_cfg(data.data_dir, "fastnet", epochs=3, compile=True, cpu_amp=False, progressive_res=20,
                   progressive_epochs=2)  # 20, 24, 28 px
    symbols, lines, graphs = [], [], []

    class SymbolicSizes(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "create_symbol" in message and ".size()" in message:
                symbols.append(message)

    def log(line):
        lines.append(line)
        if line.startswith("[bench seed") and ": test_acc " in line:  # after each epoch: the graphs compiled so far
            graphs.append(counters["stats"]["unique_graphs"])

    shapes, handler = logging.getLogger("torch.fx.experimental.symbolic_shapes"), SymbolicSizes()
    torch._logging.set_logs(dynamic=logging.INFO)
    shapes.addHandler(handler)
    try:
        torch._dynamo.reset()
        run_bench(cfg, [0], [], log=log)
    finally:
        shapes.removeHandler(handler)
        torch._logging.set_logs()
    assert "[bench] warm-up run of 3 epochs (every training width), for compilation (not counted)" in lines
    assert not symbols, symbols[:3]  # no symbolic image sizes: one static graph per width
    assert len(graphs) == 6 and graphs[2] >= 3  # warm-up epochs, then timed ones; a graph per width at least
    assert graphs[3:] == [graphs[2]] * 3, graphs  # the timed run found every width compiled


def test_a_failing_torch_compile_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import torch._dynamo
    import torch._inductor.config as inductor

    # the real failure of a machine without a C++ compiler: inductor cannot build its CPU kernels
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # no kernels from an earlier test's cache
    torch._dynamo.reset()
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--set", "train.compile=true", *TINY])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (torch may log its own lines before it)
    assert code == 2 and last.startswith("cifarlens: error: torch.compile failed") and "no-such-c++-compiler" in last
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"  # the folder stays
    torch._dynamo.reset()


@pytest.mark.parametrize("model, recipe, extra", [
    pytest.param("lensnet", "modern", {}, marks=pytest.mark.slow),  # ~6 s each; CI runs them with the slow set
    pytest.param("lensnet", "reference", {}, marks=pytest.mark.slow),
    ("fastnet", "fast", {"epochs": 4, "prune_easy": 0.5}),  # the resumed third epoch leaves out images by their scores
])
def test_resume_after_interruption_ends_where_an_uninterrupted_run_would(tmp_path, model, recipe, extra):
    data = make_fashion_mnist(tmp_path / "data", n_train=200, n_test=50)
    full = tmp_path / "full"
    cfg = tiny_cfg(data.data_dir, model, recipe=recipe, **extra)
    train(cfg, full)

    def stop_after_two(state, model):
        if state.epoch == 2:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, cut, on_epoch_end=stop_after_two)
    assert json.loads((cut / "run.json").read_text())["status"] == "interrupted"
    assert main(["train", "--resume", str(cut)]) == 0  # the CLI path a user takes

    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    hist = lambda p: drop_time(list(csv.DictReader((p / "history.csv").open())))  # noqa: E731
    assert hist(full) == hist(cut)
    assert json.loads((full / "metrics.json").read_text())["accuracy"] == \
        json.loads((cut / "metrics.json").read_text())["accuracy"]


def test_resume_remembers_no_report(tmp_path):
    """A run started with --no-report and interrupted does not write report.html when resumed."""
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"

    def stop_after_one(state, model):
        if state.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(data.data_dir, "lensnet", recipe="modern"), out, on_epoch_end=stop_after_one, report=False)
    assert json.loads((out / "run.json").read_text())["report"] is False
    assert main(["train", "--resume", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert (out / "metrics.json").is_file() and not (out / "report.html").exists()


def test_a_run_stopped_before_its_evaluation_is_resumed_and_only_evaluates(tmp_path, monkeypatch):
    """run.json says "finished" only once the test metrics are written; before that, --resume
    evaluates (the docs' promise), without training again."""
    import cifarlens.evaluation as evaluation

    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    calibrate = evaluation.calibrate_run

    def stopped(*args, **kwargs):  # Ctrl-C while the temperature is fitted
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "calibrate_run", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(data.data_dir, "lensnet", recipe="modern", epochs=2), out, report=False)
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["epochs_done"] == 2 and not (out / "metrics.json").exists()
    history = (out / "history.csv").read_text()
    monkeypatch.setattr(evaluation, "calibrate_run", calibrate)
    assert main(["train", "--resume", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished" and (out / "metrics.json").is_file()
    assert (out / "history.csv").read_text() == history  # no epoch trained again


def test_existing_run_folder_is_not_overwritten_without_force(fashion_run, tmp_path):
    out, data = fashion_run
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = cli("train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--out", str(out),
               "--epochs", "1", *TINY)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # a folder that is not a run is never cleared, even with --force
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--out", str(other),
                 "--force", "--epochs", "1", *TINY]) == 2
    assert (other / "thesis.tex").read_text() == "precious"


@pytest.mark.slow  # ~5 s; CI runs it with the slow set
def test_force_overwrites_a_run(tmp_path):
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--out", str(out), *TINY]
    assert main([*args, "--epochs", "2"]) == 0
    # what commands wrote about the old model goes with it (robustness.json was left: a later
    # --reference to the run took the old model's figures); the user's own files stay
    for name in ("robustness.json", "other-data/test-0123/metrics.json", "notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    assert main([*args, "--epochs", "1", "--force"]) == 0
    assert len(list(csv.DictReader((out / "history.csv").open()))) == 1
    assert not (out / "robustness.json").exists() and not (out / "other-data").exists()
    assert (out / "notes.txt").read_text() == "{}"


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "fashion-mnist", "--data-dir", "{missing}", "--no-download"], "Fashion-MNIST"),
    (["train", "--dataset", "imagefolder", "--data-dir", "{missing}"], "{missing}"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "{data}", "--set", "train.lr=fast"], "train.lr"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "{data}", "--config", "{missing}.yaml"], "not found"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "{data}", "--device", "cuda:7"], "cuda"),
    (["evaluate", "{missing}"], "not found"),
    (["evaluate", "{run}/model.safetensors"], "model.safetensors is a file; a run is the folder"),  # "not found"
    (["predict", "{run}", "{data}/nope.png"], "nope.png"),
    (["train", "--resume", ""], "--resume is empty"),  # it started a new default training, downloading CIFAR-10
])
def test_user_mistakes_get_one_line_errors(args, message, tmp_path, fashion_run):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out, data = fashion_run
    values = {"missing": str(tmp_path / "missing"), "data": str(data.data_dir), "run": str(out)}
    proc = cli(*[a.format(**values) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifarlens: error:")
    assert message.format(**values) in lines[0]


@pytest.mark.parametrize("args, message", [(["train", "--model", "resnet9000"], "unknown model 'resnet9000'"),
                                           (["train", "--dataset", "mnist"], "unknown dataset 'mnist'"),
                                           (["train", "--epochs", "many"], "invalid int value: 'many'")])
def test_bad_flag_values_are_refused_by_the_parser(args, message):
    proc = cli(*args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # ~7 s; CI runs it with the slow set (the in-process truncated-checkpoint test stays)
def test_corrupt_checkpoint_and_weights_are_refused(fashion_run, tmp_path):
    import shutil

    out, _ = fashion_run
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    proc = cli("predict", str(broken), "x.png")
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    (broken / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated zip")
    interrupted(broken)  # a finished run is not resumed at all
    proc = cli("train", "--resume", str(broken))
    assert proc.returncode == 2 and "last.pt" in proc.stderr and "Traceback" not in proc.stderr
    whole = (out / "checkpoints" / "last.pt").read_bytes()  # cut short, as by a full disk or a copy that stopped
    (broken / "checkpoints" / "last.pt").write_bytes(whole[:-100])
    with pytest.raises(cifarlens.CifarlensError, match=r"\(truncated: its zip archive ends before its directory"):
        load_checkpoint(broken / "checkpoints" / "last.pt")  # torch said "[Errno 22] Invalid argument", or cut short


def _flip_a_byte_in_the_largest_tensor(path: Path) -> None:
    """One bit of a weight changed on disk, headers intact: torch.load and safetensors would load it."""
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as archive:
            entry = max(archive.infolist(), key=lambda e: e.file_size)
        name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
        at = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    else:  # safetensors: the tensors' bytes come after the header
        at = 8 + struct.unpack("<Q", data[:8])[0] + (len(data) - 8 - struct.unpack("<Q", data[:8])[0]) // 2
    data[at] ^= 0x10
    path.write_bytes(data)


@pytest.mark.slow  # ~9 s; CI runs it with the slow set (the default suite's 7-minute budget)
def test_weights_damaged_on_disk_are_refused_not_loaded(fashion_run, tmp_path):
    import shutil

    out, data = fashion_run
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    _flip_a_byte_in_the_largest_tensor(damaged / "model.safetensors")
    proc = cli("predict", str(damaged), str(image))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.safetensors is damaged" in proc.stderr and "checksum" in proc.stderr
    assert cli("predict", str(out), str(image)).returncode == 0  # the intact run still predicts

    _flip_a_byte_in_the_largest_tensor(damaged / "checkpoints" / "last.pt")
    interrupted(damaged)
    proc = cli("train", "--resume", str(damaged))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "last.pt" in proc.stderr and "do not match their checksum" in proc.stderr


def test_a_pickled_payload_in_a_checkpoint_is_never_executed(fashion_run, tmp_path):
    import shutil

    out, _ = fashion_run
    evil = tmp_path / "evil"
    shutil.copytree(out, evil)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "cifarlens-checkpoint", "payload": Exploit()}, evil / "checkpoints" / "last.pt")
    interrupted(evil)
    proc = cli("train", "--resume", str(evil))
    assert proc.returncode == 2 and "last.pt" in proc.stderr and "safe loader refused it" in proc.stderr
    assert "weights_only" not in proc.stderr  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()


def test_diverging_loss_stops_with_a_message(tmp_path):
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    proc = cli("train", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--out", str(tmp_path / "r"),
               "--recipe", "reference", "--lr", "1e30", "--epochs", "2", *TINY)
    assert proc.returncode == 2 and "became" in proc.stderr and "--lr" in proc.stderr
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "diverged"


def test_config_file_and_flags_take_precedence(tmp_path):
    data = make_fashion_mnist(tmp_path / "data", n_train=100, n_test=20)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"data: {{dataset: fashion-mnist, data_dir: '{data.data_dir}'}}\n"
                        "train: {recipe: reference, epochs: 5, lr: 3e-3}\n"
                        "model: {name: lensnet_light, kwargs: {widths: [8, 16], depths: [1, 1]}}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg_file), "--epochs", "1", "--out", str(out)]) == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1  # flag beats file
    assert saved["train"]["lr"] == 0.003  # file beats recipe
    assert saved["train"]["optimizer"] == "adam"  # recipe fills the rest
    assert saved["train"]["schedule"] == "plateau"


@pytest.mark.parametrize("dataset, fixture", [("cifar10", "cifar10_dir"),
                                              pytest.param("cifar100", "cifar100_dir", marks=pytest.mark.slow),  # ~6 s
                                              ("imagefolder", "imagefolder_dir")])
def test_train_on_every_dataset(dataset, fixture, request, tmp_path):
    data_dir = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    if dataset == "imagefolder":  # a file name that is not UTF-8 (Latin-1, a zip made on Windows): the run died at
        first = sorted((data_dir / "test").glob("*/*"))[0]  # its end writing predictions.csv, status interrupted
        latin1 = os.fsencode(first.parent) + b"/caf\xe9" + os.fsencode(first.suffix)
        os.rename(first, latin1)
    assert main(["train", "--dataset", dataset, "--data-dir", str(data_dir), "--epochs", "1", "--out", str(out),
                 "--no-download", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    meta = json.loads((out / "run.json").read_text())
    assert len(metrics["per_class"]) == len(meta["dataset"]["classes"]) == (100 if dataset == "cifar100" else 10)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    if dataset == "imagefolder":  # statistics computed from its own training images, not CIFAR's
        assert meta["dataset"]["mean"] != [0.4914, 0.4822, 0.4465]
        assert all(0 < s < 1 for s in meta["dataset"]["std"])
        # each prediction names its file, below the data folder, in the class folder of its label
        assert list(rows[0])[:3] == ["index", "file", "label"] and len(rows) == 50
        assert all(((data_dir / r["file"]).is_file() or r["file"].endswith("/caf\\udce9" + first.suffix)) and
                   r["file"].split("/")[:2] == ["test", r["label"]] for r in rows)  # that name escaped
        assert len({r["file"] for r in rows}) == 50 and json.loads((out / "run.json").read_text())["status"] == "finished"
    else:  # the official files: the index is the image's place in the test batch
        assert "file" not in rows[0]


def test_bench_reports_mean_and_std_over_seeds(tmp_path, capsys):
    data = make_fashion_mnist(tmp_path / "data", n_train=200, n_test=50)
    summary_file = tmp_path / "bench.json"
    assert main(["bench", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "2",
                 "--seeds", "2", "--targets", "0.2,1.0", "--json", str(summary_file), *TINY]) == 0
    out = capsys.readouterr().out
    assert "test accuracy (best-on-validation weights):" in out and "±" in out
    assert "time to 100.00% test accuracy" in out
    # train's "results in /tmp/.../run" names a folder that is gone once the seed ends: said before it
    assert out.count("training in a temporary run folder") == 2 and "deleted when the seed ends" in out
    summary = json.loads(summary_file.read_text())
    assert summary["seeds"] == [0, 1] and len(summary["test_acc"]) == 2
    assert summary["test_acc"][0] != summary["test_acc"][1] or summary["train_seconds"][0] > 0
    assert all(v > 0 for v in summary["images_per_second"]) and summary["peak_memory_mb"] > 0
    assert summary["epochs_to"]["0.2"] != [None, None]  # learnable data: 20% is reached


def test_bench_throughput_counts_only_the_batches_of_a_partial_last_epoch(tmp_path, capsys):
    data = make_fashion_mnist(tmp_path / "data", n_train=200, n_test=50)  # 180 training images, 10 batches of 18
    summary_file = tmp_path / "bench.json"
    assert main(["bench", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "2",
                 "--seeds", "1", "--json", str(summary_file), *TINY, "--batch-size", "18",
                 "--set", "train.last_epoch_fraction=0.5"]) == 0
    summary = json.loads(summary_file.read_text())
    trained = summary["images_per_second"][0] * summary["train_seconds"][0]
    assert trained == pytest.approx(180 + 90, rel=1e-6)  # the second epoch trained 5 of its 10 batches


def test_bench_seed_sets_the_first_seed(tmp_path, capsys):
    """--seed S --seeds N benchmarks seeds S..S+N-1, so one benchmark can be split over sittings."""
    data = make_fashion_mnist(tmp_path / "data", n_train=200, n_test=50)
    summary_file = tmp_path / "bench.json"
    assert main(["bench", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--seed", "3", "--seeds", "1", "--targets", "0.5", "--json", str(summary_file), *TINY]) == 0
    assert json.loads(summary_file.read_text())["seeds"] == [3]
    assert "1 seed(s): [3]" in capsys.readouterr().out
    config = tmp_path / "seed.yaml"  # the seed from a config file (or --set train.seed) too: it ran seed 0
    config.write_text("train:\n  seed: 4\ntrack:\n  loggers: [tensorboard]\n")
    assert main(["bench", "--dataset", "fashion-mnist", "--data-dir", str(data.data_dir), "--epochs", "1",
                 "--config", str(config), "--seeds", "1", "--targets", "0.5", "--json", str(summary_file), *TINY]) == 0
    assert json.loads(summary_file.read_text())["seeds"] == [4]
    printed = capsys.readouterr().out  # its runs are temporary: TensorBoard logged into a deleted folder
    assert "[bench] warning: track.loggers (tensorboard) are not used" in printed and "tracking:" not in printed


def test_the_command_line_does_not_import_torchvision_until_a_backbone_is_built():
    """Importing torchvision takes about 2 s (it pulls in torch._dynamo), which every command,
    even a mistyped flag, would pay; only the pretrained backbones need it."""
    code = ("import sys; from cifarlens.cli import main\n"
            "try: main(['train', '--epochs', 'abc'])\n"
            "except SystemExit: pass\n"
            "import cifarlens.models, cifarlens.runs; assert 'torchvision' not in sys.modules, 'imported'\n"
            "cifarlens.models.create_model('resnet18', 10, 3); assert 'torchvision' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "invalid int value: 'abc'" in result.stderr


@pytest.mark.parametrize("args, hint", [
    (["--dataset", "cifar-10"], "argument --dataset: unknown dataset 'cifar-10' (did you mean cifar10?); choose one of"),
    (["--dataset", "Fashion_MNIST"], "(did you mean fashion-mnist?)"),
    (["--model", "resnet2"], "unknown model 'resnet2' (did you mean resnet32 or resnet20?)"),
    (["--recipe", "fastcpu"], "(did you mean fast_cpu?)"),
    (["--set", "model.name=resnt20"], "unknown model 'resnt20' (did you mean resnet20 or resnet50?)"),
    (["--augment", "standard+cutot"], "(did you mean cutout?)"),
    (["--set", "train.optimzer=muon"], "unknown config key 'train.optimzer' (did you mean train.optimizer?)"),
    (["--set", "train.schedule=cosin"], "unknown train.schedule 'cosin' (did you mean cosine?)"),
    # data settings: refused before any data is read (the folder below holds none)
    (["--set", "data.flip=alternatin"], "unknown data.flip 'alternatin' (did you mean alternating?)"),
    (["--set", "data.loader=perimag"], "(did you mean perimage?)"),  # was silently the batched loader
    (["--set", "data.augment=standrd"], "unknown augmentation level 'standrd' (did you mean standard?)"),
    (["--set", "data.val_fraction=1.5"], "data.val_fraction must be in [0, 1)"),
    # numbers too large to hold: were tracebacks (an overflow, a failed allocation)
    (["--seed", "99999999999999999999999"], "train.seed must be a whole number from 0 to 2**63 - 1"),
    (["--set", "data.image_size=100000000000"], "image size must be a whole number of pixels from 1 to 4096"),
])
def test_a_misspelt_name_is_answered_with_the_closest_ones(args, hint, tmp_path, capsys):
    with pytest.raises(SystemExit) if args[0] not in ("--set", "--seed") else contextlib.nullcontext():
        code = main(["train", *args, "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "none"),
                     "--no-download"])
        assert code == 2
    err = capsys.readouterr().err
    assert hint in err.strip().splitlines()[-1], err  # (argparse prints its usage above)
    assert not (tmp_path / "run").exists()


def test_a_wrong_key_or_value_in_a_config_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    for text, hint in (("train:\n  optimzer: muon\n", "unknown config key 'train.optimzer' (did you mean "
                                                         "train.optimizer?)"),
                       ("train:\n  epochs: three\n", "config key 'train.epochs' must be int, got 'three'"),
                       ("false\n", "a config must be a mapping with sections data/model/train/track"),  # was {}
                       ("[]\n", "a config must be a mapping with sections data/model/train/track")):
        config.write_text(text)
        assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-download"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"cifarlens: error: {config}: {hint}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, hint", [
    (["bench", "--set", "data.loader=perimag"], "(did you mean perimage?)"),
    (["tune", "--trials", "1", "--set", "data.flip=alternatin"], "(did you mean alternating?)"),
    (["baselines", "--dataset", "cifar1"], "unknown dataset 'cifar1' (did you mean cifar10 or cifar100?)"),
    (["robustness", "RUN", "--corruptions", "fog,gausian_noise"], "unknown corruption 'gausian_noise' (did you mean "
                                                                   "gaussian_noise"),
])
def test_other_commands_name_the_closest_choice_before_reading_data(argv, hint, tmp_path, capsys):
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    if argv[0] in ("bench", "tune"):
        argv += ["--data-dir", str(tmp_path / "none"), "--no-download"]
        argv += ["--json", str(tmp_path / "out")] if argv[0] == "bench" else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) if argv[0] == "baselines" else contextlib.nullcontext():
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert hint in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_list_shows_each_recipes_own_settings_by_their_set_names(capsys):
    from cifarlens.recipes import RECIPES, list_recipes

    assert main(["list"]) == 0
    lines = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert set(list_recipes()) <= set(lines)
    ten = lines["fast_cpu_10min"]
    assert "optimizer=muon" in ten and "muon_lr=0.2" in ten and "progressive_res=24" in ten
    assert ten.endswith("; data: val_fraction=0.0, crop_padding=2, flip=alternating")
    assert "muon_lr" not in lines["fast_cpu"] and "progressive_res" not in lines["modern"]  # off: not shown
    reference = lines["reference"]  # Adam on a plateau schedule: no momentum, no milestones
    assert "plateau_patience=2" in reference and "momentum" not in reference and "milestones" not in reference
    assert "milestones=[60, 120, 160], gamma=0.2" in lines["wrn2016"] and "plateau" not in lines["wrn2016"]
    for name in list_recipes():  # every value shown is the recipe's own
        settings = lines[name].split(": ", 1)[1].split("; data:")[0]
        for key, value in re.findall(r"(\w+)=(\[[^\]]*\]|[^,]+)", settings):
            assert str(RECIPES.get(name)[key]) == value, (name, key, value)


def test_output_cut_short_by_its_reader_ends_quietly():
    """``cifarlens list | head -1``: the reader closes the pipe; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "cifarlens.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `head` does once it has its line: every write from now on hits a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_a_wrong_data_dir_for_a_run_on_official_files_is_an_error_not_a_download(fashion_run, tmp_path, capsys):
    """The run may download (it did not need to), but a --data-dir says where the data is now:
    nothing is fetched into it, nothing written there, and the run's figures stay."""
    out, _ = fashion_run
    metrics = (out / "metrics.json").read_bytes()
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    for command in (["evaluate", str(out)], ["calibrate", str(out)]):
        capsys.readouterr()
        assert main([*command, "--data-dir", str(empty)]) == 2
        assert "Fashion-MNIST not found" in capsys.readouterr().err
        assert list(empty.iterdir()) == []
        assert main([*command, "--data-dir", str(tmp_path / "missing")]) == 2
        assert f"no folder {tmp_path / 'missing'}" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists() and (out / "metrics.json").read_bytes() == metrics


def test_an_interrupted_bench_still_shows_the_seeds_it_finished(monkeypatch, capsys, tmp_path):
    import cifarlens.bench as bench
    from cifarlens.config import RunConfig

    def one(cfg, seed, targets, log):  # two seeds measured, the third interrupted (Ctrl-C)
        if seed == 2:
            raise KeyboardInterrupt
        return bench.SeedResult(seed, 0.90 + seed / 100, 400.0 + 100 * seed, 1302.0 + 1500 * seed, {0.9: 300.0}, {0.9: 6})

    monkeypatch.setattr(bench, "bench_one", one)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(RunConfig(), [0, 1, 2], [0.9], json_out=tmp_path / "bench.json")
    saved = json.loads((tmp_path / "bench.json").read_text())  # --json keeps them too
    assert saved["seeds"] == [0, 1] and saved["interrupted_during_seed"] == 2
    out = capsys.readouterr().out
    assert "interrupted during seed 2; the 2 finished seed(s):" in out
    assert "2 seed(s): [0, 1]; mean ± sample standard deviation over them" in out
    assert "test accuracy (best-on-validation weights): 90.50 ± 0.71 %" in out
    assert "throughput 2052 ± 1061 images/s" in out  # not 2.1e+03 ± 1.1e+03


def test_bench_checks_where_its_json_goes_before_training(tmp_path, capsys):
    """It trained every seed first, then failed naming a hidden temporary file."""
    missing = tmp_path / "data-that-is-not-there"  # never read: the check comes first
    for target, message in ((tmp_path, "is a folder"), (tmp_path / "no" / "b.json", f"no folder {tmp_path / 'no'}")):
        assert main(["bench", "--dataset", "imagefolder", "--data-dir", str(missing), "--json", str(target)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.mark.slow  # a CLI process, ~7 s; CI runs it with the slow set
def test_a_training_whose_output_reader_leaves_goes_on(fashion_run, tmp_path):
    """`cifarlens train ... | head -1` stopped the run (BrokenPipeError at its next log line)."""
    _, data = fashion_run
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cifarlens.cli", "train", "--dataset", "fashion-mnist",
                             "--data-dir", str(data.data_dir), "--epochs", "3", "--no-report", "--out", str(out),
                             *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # the first line, as `head -1` reads it, then the reader is gone
    proc.stdout.close()
    proc.wait(timeout=300)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert "epoch 3/3" in (out / "train.log").read_text()


def test_an_output_path_the_system_cannot_create_is_one_line(fashion_run, tmp_path):
    out, data = fashion_run
    image = tmp_path / "x.png"
    Image.fromarray(data.test_images[0, 0]).save(image)
    proc = cli("predict", str(out), str(image), "--csv", "/proc/cifarlens-test.csv")  # /proc makes no new files
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "cifarlens: error: No such file or directory: /proc/cifarlens-test.csv"
