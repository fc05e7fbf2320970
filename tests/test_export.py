"""``cifarlens export``: ONNX that matches PyTorch (checked by onnxruntime) and self-describing safetensors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cifarlens import export
from cifarlens.api import load_run, train
from cifarlens.checkpoint import load_weights, save_weights
from cifarlens.cli import main
from cifarlens.config import RunConfig, merge
from cifarlens.errors import CifarlensError
from conftest import make_cifar10, make_fashion_mnist

# Two registered model types on the two channel counts; tiny, and one short epoch each.
MODELS = {
    "lensnet": ("fashion-mnist", {"widths": [8, 16], "depths": [1, 1]}),
    "resnet20": ("cifar10", {}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (run folder, synthetic data); each model is trained once, on first use, for one epoch."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            dataset, kwargs = MODELS[name]
            root = tmp_path_factory.mktemp(f"export-{name}")
            if dataset == "cifar10":
                data = make_cifar10(root / "data", n_train_per_batch=8, n_test=20)
            else:
                data = make_fashion_mnist(root / "data", n_train=120, n_test=20)
            cfg = merge(RunConfig(), {
                "data": {"dataset": dataset, "data_dir": str(data.data_dir), "download": False},
                "model": {"name": name, "kwargs": kwargs},
                # modern: the recipe the README gives these families (fast_cpu is for FastNet)
                "train": {"recipe": "modern", "batch_size": 32, "epochs": 1},
            })
            train(cfg, root / "run", evaluate_test=False)  # the test metrics are not what is tested here
            cache[name] = (root / "run", data)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(runs):
    """name -> (run folder, data, onnx path, max diff, log), exported once per model."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            run_dir, data = runs(name)
            lines: list[str] = []
            path, diff = export.export_onnx(run_dir, log=lines.append)
            cache[name] = (run_dir, data, path, diff, "\n".join(lines))
        return cache[name]

    return get


@pytest.fixture
def lensnet(runs):
    return runs("lensnet")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_matches_pytorch(name, exported):
    run_dir, data, path, diff, log = exported(name)
    assert path == run_dir / "model.onnx" and path.is_file()
    meta = export.onnx_metadata(path)
    assert 0 <= diff <= meta["tolerance"] and meta["tolerance"] >= export.ONNX_TOLERANCE  # relative to |logit|
    assert "random normal" in log and "test image" in log and "tolerance" in log  # both checks ran

    # an independent check on another batch size (the batch axis is dynamic), through the real preprocessing
    run = load_run(run_dir)
    images = torch.from_numpy(data.test_images[:5])
    session = export.onnx_session(path)
    logits = export.run_onnx(session, run.preprocess(images).numpy())
    with torch.no_grad():
        ref = run.model(run.preprocess(images)).numpy()
    assert logits.shape == (5, len(data.classes))
    np.testing.assert_allclose(logits, ref, atol=export.ONNX_TOLERANCE * max(1.0, np.abs(ref).max()), rtol=0)
    assert (logits.argmax(1) == ref.argmax(1)).all()

    assert meta["dataset"]["classes"] == list(data.classes) and meta["max_abs_diff"] == diff
    assert meta["weights_sha256"] == export.weights_digest(run_dir) and export.onnx_is_current(run_dir)


def test_onnx_with_fixed_batch(lensnet, tmp_path):
    run_dir, data = lensnet
    path, diff = export.export_onnx(run_dir, tmp_path / "fixed.onnx", batch_dynamic=False)
    session = export.onnx_session(path)
    assert session.get_inputs()[0].shape[0] == 1 and diff <= export.ONNX_TOLERANCE
    run = load_run(run_dir)
    x = run.preprocess(torch.from_numpy(data.test_images[:3]))
    assert export.run_onnx(session, x.numpy()).shape == (3, len(data.classes))  # one image at a time


def test_a_mismatching_export_is_refused_and_not_written(lensnet, tmp_path, monkeypatch):
    run_dir, _ = lensnet
    real = export.run_onnx
    monkeypatch.setattr(export, "run_onnx", lambda session, x: real(session, x) + 1e-2)
    out = tmp_path / "bad.onnx"
    with pytest.raises(CifarlensError, match="differ from PyTorch"):
        export.export_onnx(run_dir, out)
    assert not out.exists() and not list(tmp_path.iterdir())  # no temp file left either


@pytest.mark.parametrize("fmt, name", [("onnx", "run.json"), ("onnx", "checkpoints/last.pt"),
                                       ("safetensors", "model.safetensors"), ("safetensors", "run.safetensors")])
def test_an_export_never_replaces_the_runs_own_files(lensnet, fmt, name, capsys):
    """(run.safetensors would put its description in run.json, beside it.)"""
    run_dir, _ = lensnet
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(run_dir / name)]) == 2
    err = capsys.readouterr().err
    assert "is one of the run's own files; choose another file" in err and len(err.strip().splitlines()) == 1, err
    default = "model.onnx" if fmt == "onnx" else "export/model.safetensors"  # where this format goes by default
    assert f"(default: {run_dir / default}" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_the_docs_onnxruntime_example_gives_predicts_probabilities(exported, tmp_path):
    """The snippet of docs/serving-and-export.md, run as a user would, on photos as cameras save
    them (EXIF-rotated), 16-bit grey and RGBA: it disagreed with predict on the first two."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    docs = (Path(__file__).resolve().parents[1] / "docs" / "serving-and-export.md").read_text()
    snippet = re.search(r"With onnxruntime alone:\n\n```python\n(.*?)```", docs, re.S).group(1)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)
    rotated = Image.fromarray(pixels)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: turn 90 degrees to view
    images = {"rotated.jpg": lambda p: rotated.save(p, exif=exif, quality=95),
              "grey16.png": lambda p: Image.fromarray(rng.integers(0, 65536, (30, 30)).astype(np.uint16)).save(p),
              "rgba.png": lambda p: Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)).save(p),
              # a dark 16-bit PNG (values <= 255, still 16-bit) and a float TIFF in [0, 1]: the snippet read them
              # as 8-bit values and as black
              "dark16.png": lambda p: Image.fromarray(rng.integers(0, 256, (30, 30)).astype(np.uint16)).save(p),
              "float.tiff": lambda p: Image.fromarray(rng.random((30, 30), dtype=np.float32)).save(p)}
    for image, write in images.items():
        write(tmp_path / image)
    for name in ("lensnet", "resnet20"):
        run_dir, _, onnx_path, _, _ = exported(name)
        run = load_run(run_dir)
        # the snippet as written, once per image, in one process (a process each took ~1 s of imports)
        script = "\n".join(snippet.replace("RUN_DIR/model.onnx", str(onnx_path)).replace("cat.jpg", str(tmp_path / image))
                           for image in images)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        assert len(lines) == len(images), lines
        for image, line in zip(images, lines):
            label, prob = line.rsplit(" ", 1)  # (class names may hold spaces: "Ankle boot")
            top = run.predict([tmp_path / image], topk=1)[0]
            assert (label, float(prob)) == (top.labels[0], pytest.approx(top.probs[0], abs=1e-5)), (name, image)


def test_an_export_or_a_table_never_replaces_another_runs_files(runs, tmp_path, capsys):
    source, (other, _) = runs("lensnet")[0], runs("resnet20")
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (28, 28)).save(image)
    attempts = [(["export", str(source), "--format", "onnx", "--out", str(other / "model.safetensors")],
                 "is one of the run's own files"),
                (["export", str(source), "--format", "onnx", "--out", str(tmp_path / "model.safetensors")],
                 "should end in .onnx"),
                (["export", str(source), "--format", "onnx", "--out", str(other / "checkpoints" / "x.onnx")],
                 "is one of the run's own files"),
                (["export", str(source), "--format", "safetensors", "--out", str(other / "model.safetensors")],
                 "is one of the run's own files"),
                (["predict", str(source), str(image), "--csv", str(other / "predictions.csv")],
                 "is one of the run's own files"),
                (["export", str(source), "--format", "onnx", "--out", str(other / "model.onnx")],
                 "is an export of the run"),
                (["export", str(source), "--format", "safetensors", "--out", str(other / "export" / "m.safetensors")],
                 "is an export of the run")]
    for args, message in attempts:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_new_weights_make_the_onnx_file_stale(exported, tmp_path):
    run_dir = exported("lensnet")[0]
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert export.onnx_is_current(copy)
    state = load_weights(copy / "model.safetensors")
    save_weights({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, copy / "model.safetensors")
    assert not export.onnx_is_current(copy)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_weights_replaced_during_an_export_are_an_error_not_an_older_file(lensnet, tmp_path, monkeypatch, capsys, fmt):
    """A training that went on during an export replaced the weights: the export wrote the older ones
    (after the training's end had removed the exports it made stale), and described them by the new
    weights' digest, so serve --backend onnx took the file for current."""
    copy = tmp_path / "run"
    shutil.copytree(lensnet[0], copy, ignore=shutil.ignore_patterns("model.onnx", "export"))  # others' exports
    describe = export.describe_run

    def training_goes_on(run, digest=None):
        state = load_weights(copy / "model.safetensors")
        save_weights({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, copy / "model.safetensors")
        return describe(run, digest)

    monkeypatch.setattr(export, "describe_run", training_goes_on)
    assert main(["export", str(copy), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert f"the weights of {copy} changed while they were exported (is it still training?); not writing" in err
    assert not (copy / "model.onnx").exists() and not (copy / "export").exists()
    monkeypatch.undo()
    assert main(["export", str(copy), "--format", fmt]) == 0  # the same export once the weights stay


def test_export_cli_onnx_and_safetensors(lensnet, tmp_path, capsys):
    run_dir, data = lensnet
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(data.test_images[0, 0]).save(image)
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--images", str(image)]) == 0
    out = capsys.readouterr().out
    assert "given image" in out and "max |logit diff|" in out and "tolerance 0.0001" in out
    assert (tmp_path / "m.onnx").is_file()
    folder = tmp_path / "images"  # a folder of images, as predict takes one
    folder.mkdir()
    for i in range(3):
        Image.fromarray(data.test_images[i, 0]).save(folder / f"{i}.png")
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--images", str(folder)]) == 0
    assert "onnx check on 3 given image inputs" in capsys.readouterr().out

    assert main(["export", str(run_dir), "--format", "safetensors"]) == 0
    assert (run_dir / "export" / "model.safetensors").is_file() and (run_dir / "export" / "model.json").is_file()
    assert main(["export", str(run_dir), "--format", "safetensors"]) == 0  # an earlier export's files: replaced
    notes = tmp_path / "notes.json"  # the user's own file where the description would go
    notes.write_text('{"mine": true}')
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "notes.safetensors")]) == 2
    assert f"would replace {notes}, which is not an earlier export's description" in capsys.readouterr().err
    assert notes.read_text() == '{"mine": true}' and not (tmp_path / "notes.safetensors").exists()
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "UP.SAFETENSORS")]) == 0
    assert main(["export", str(run_dir), "--format", "safetensors", "--opset", "17"]) == 2
    capsys.readouterr()
    for fmt, name in (("onnx", "m.onnx"), ("safetensors", "m.safetensors")):  # a typo in the folder: not made
        assert main(["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / "typo" / name)]) == 2
        assert f"no folder {tmp_path / 'typo'}" in capsys.readouterr().err
        assert not (tmp_path / "typo").exists()
    shutil.rmtree(run_dir / "export")  # the run's own export/ is made for any file named in it
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(run_dir / "export" / "b.safetensors")]) == 0
    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(MODELS))
def test_safetensors_export_rebuilds_the_same_model(name, runs, tmp_path):
    run_dir, data = runs(name)
    path = export.export_safetensors(run_dir, tmp_path / "shared.safetensors")
    description = json.loads(path.with_suffix(".json").read_text())
    assert description["dataset"]["classes"] == list(data.classes)
    assert len(description["dataset"]["mean"]) == len(description["dataset"]["std"]) == data.test_images.shape[1]
    assert description["model"]["name"] == load_run(run_dir).config.model.name
    with safe_open(str(path), "pt") as f:  # the header carries the description too
        header = f.metadata()
    assert json.loads(header["dataset"])["classes"] == list(data.classes)

    model, _ = export.load_exported(path)
    run = load_run(run_dir)
    x = run.preprocess(torch.from_numpy(data.test_images[:4]))
    with torch.no_grad():
        assert torch.equal(model(x), run.model(x))
    # a folder, a typo, a damaged description: one CifarlensError each (a missing .json was named, or a raw
    # JSONDecodeError / KeyError came out)
    for target, text, words in ((tmp_path, None, "is a folder"), (tmp_path / "typo.safetensors", None, "not found"),
                                (path, "{not json", "is not the description `cifarlens export` writes"),
                                (path, "[]", "is not the description"), (path, '{"model": {}}', "is not the description")):
        if text is not None:
            path.with_suffix(".json").write_text(text)
        with pytest.raises(CifarlensError, match=re.escape(words)):
            export.load_exported(target)


@pytest.mark.parametrize("opset", [7, 17, 99])
def test_an_opset_that_cannot_be_written_is_refused_before_any_work(lensnet, tmp_path, opset):
    """torch's exporter writes opset 18 natively: asked for 7 it once wrote 18 and recorded 7."""
    run_dir, _ = lensnet
    with pytest.raises(CifarlensError, match=f"opset {opset} cannot be written here"):
        export.export_onnx(run_dir, tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def test_the_metadata_says_which_test_time_views_predict_averages(exported, tmp_path):
    run_dir, _, path, _, _ = exported("lensnet")

    run = load_run(run_dir)
    assert export.onnx_metadata(path)["tta"] == {"flip": run.tta, "translate_px": run.tta_translate}
    with pytest.raises(CifarlensError, match="is a folder"):
        export.export_onnx(run_dir, tmp_path)


def test_opset_0_is_refused_and_the_safetensors_description_names_the_tta(exported, tmp_path, capsys):
    """--opset 0 silently became 18; model.json lacked the views predict averages."""
    import json

    from cifarlens.cli import main

    run_dir, _, _, _, _ = exported("lensnet")
    assert main(["export", str(run_dir), "--format", "onnx", "--opset", "0", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "opset 0 cannot be written here" in capsys.readouterr().err
    path = export.export_safetensors(run_dir, tmp_path / "w.safetensors")
    run = load_run(run_dir)
    assert json.loads(path.with_suffix(".json").read_text())["tta"] == {"flip": run.tta, "translate_px": run.tta_translate}


def test_an_opset_the_exporter_cannot_convert_to_names_the_model_not_a_temp_file(exported, tmp_path, monkeypatch):
    run_dir, _, _, _, _ = exported("lensnet")

    def unloadable(path):
        raise CifarlensError(f"{path} is not a loadable ONNX model (No Op registered for Gelu with domain_version of 18)")

    monkeypatch.setattr(export, "onnx_session", unloadable)
    out = tmp_path / "m.onnx"
    with pytest.raises(CifarlensError) as err:
        export.export_onnx(run_dir, out, opset=export.DEFAULT_OPSET + 1)
    message = str(err.value)
    assert message.startswith(f"torch's exporter did not write a loadable lensnet at opset {export.DEFAULT_OPSET + 1} "
                              "(No Op registered for Gelu")
    assert f"not writing {out}" in message and ".tmp" not in message and not out.exists()


def test_ctrl_c_inside_torch_export_is_an_interruption_not_a_failed_export(exported, tmp_path, monkeypatch):
    """Caught by torch.export in a lazy import, a Ctrl-C came out as "ONNX export failed (TorchExportError: ...
    \x1b[96mThis is step 1/3\x1b[0m", exit 2."""
    run_dir = exported("lensnet")[0]

    def export_hit_by_ctrl_c(*args, **kwargs):
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise AttributeError("partially initialized module 'torch._inductor'")
        except AttributeError as err:
            raise RuntimeError("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m") from err

    monkeypatch.setattr(torch.onnx, "export", export_hit_by_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        export.export_onnx(run_dir, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()

    def failing(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(CifarlensError, match=r"failed \(RuntimeError: Failed to export the model with torch.export. "
                                             r"This is step 1/3\)$"):
        export.export_onnx(run_dir, tmp_path / "m.onnx")


def test_an_opset_the_converter_cannot_reach_is_one_line_without_its_traceback(tmp_path, capsys):
    """FastNet's GELU has no adapter to opset 26: onnxscript logged its whole traceback first, and
    the error named the hidden temporary file."""
    data = make_cifar10(tmp_path / "data", n_train_per_batch=8, n_test=20)
    cfg = merge(RunConfig(), {"data": {"dataset": "cifar10", "data_dir": str(data.data_dir), "download": False},
                              "model": {"name": "fastnet_cpu", "kwargs": {"widths": [8, 8, 8]}},
                              "train": {"batch_size": 16, "epochs": 1}})
    train(cfg, tmp_path / "run", evaluate_test=False, report=False)
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--opset", "26", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "did not write a loadable fastnet_cpu at opset 26" in err and ".tmp" not in err and not out.exists()
