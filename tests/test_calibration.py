"""Temperature scaling (cifarlens.calibration) and its use by evaluate, predict, the API, serve and export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cifarlens.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE, expected_calibration_error, fit_temperature, nll


def logits_with_temperature(true_t: float, n: int = 20000, k: int = 10, seed: int = 0):
    """Labels drawn from softmax(z / true_t): the model whose logits are z has temperature true_t."""
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, k, generator=g, dtype=torch.float64)  # (N, K)
    labels = torch.multinomial((z / true_t).softmax(dim=1), 1, generator=g)[:, 0]  # (N,)
    return z, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    z, labels = logits_with_temperature(true_t)
    fit = fit_temperature(z, labels)
    assert fit.temperature == pytest.approx(true_t, rel=0.05)
    assert fit.images == len(labels)


@pytest.mark.parametrize("kind, true_t", [("overconfident", 3.0), ("underconfident", 0.4)])
def test_fit_lowers_the_nll_and_ece_of_a_miscalibrated_model(kind, true_t):
    # fitted on one half ("validation"), judged on the other
    z, labels = logits_with_temperature(true_t, n=20000, seed=1)
    fit = fit_temperature(z[:10000], labels[:10000])
    assert (fit.temperature > 1) == (kind == "overconfident")
    assert fit.nll_after < fit.nll_before - 0.01
    held_z, held_y = z[10000:], labels[10000:]
    assert nll(held_z, held_y, fit.temperature) < nll(held_z, held_y)
    assert (expected_calibration_error((held_z / fit.temperature).softmax(1), held_y)
            < expected_calibration_error(held_z.softmax(1), held_y))


def test_temperature_never_changes_the_argmax():
    z, labels = logits_with_temperature(2.0, n=5000, k=100, seed=2)
    fit = fit_temperature(z.float(), labels)
    assert torch.equal((z.float() / fit.temperature).argmax(1), z.float().argmax(1))


def test_fit_stays_within_bounds_and_rejects_empty_input():
    z = torch.tensor([[10.0, -10.0]] * 50)
    fit = fit_temperature(z, torch.zeros(50, dtype=torch.int64))  # always right: T would go to 0
    assert MIN_TEMPERATURE <= fit.temperature <= MAX_TEMPERATURE
    fit = fit_temperature(z, torch.ones(50, dtype=torch.int64))  # always wrong: T would go to infinity
    assert MIN_TEMPERATURE <= fit.temperature <= MAX_TEMPERATURE and math.isfinite(fit.nll_after)
    with pytest.raises(ValueError):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))


# -- a trained run: train -> run.json -> evaluate / predict / API / export ---------------------

@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    from conftest import train_tiny_cifar10

    return train_tiny_cifar10(tmp_path_factory.mktemp("cal"))


def test_training_fits_and_records_a_temperature_on_the_validation_split(calibrated_run):
    out, _ = calibrated_run
    meta = json.loads((out / "run.json").read_text())
    cal = meta["calibration"]
    assert cal["fitted_on"] == "val" and cal["images"] == 20  # 10 % of the 200 training images
    assert cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert "calibration: temperature" in (out / "train.log").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"]["calibrated"] and metrics["calibration"]["temperature"] == cal["temperature"]


def test_api_probabilities_are_the_scaled_softmax_and_can_be_turned_off(calibrated_run):
    from cifarlens.api import load_run

    out, data = calibrated_run
    run, raw = load_run(out), load_run(out, calibrated=False)
    assert run.calibrated and not raw.calibrated and raw.temperature is None
    images = run.data(str(data)).test.images[:16]
    logits = raw.predict_logits(images)
    torch.testing.assert_close(run.predict_proba(images), (logits / run.temperature).softmax(1))
    torch.testing.assert_close(raw.predict_proba(images), logits.softmax(1))
    assert torch.equal(run.predict_proba(images).argmax(1), raw.predict_proba(images).argmax(1))


def test_evaluate_reports_ece_with_and_without_and_keeps_the_accuracy(calibrated_run, capsys):
    from cifarlens.api import evaluate_run
    from cifarlens.cli import main

    out, data = calibrated_run
    cal = evaluate_run(out, device="cpu")
    raw = evaluate_run(out, device="cpu", calibrated=False)
    assert cal["accuracy"] == raw["accuracy"]
    assert cal["calibration"]["ece_uncalibrated"] == pytest.approx(raw["calibration"]["ece"])
    assert not raw["calibration"]["calibrated"]
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    assert "temperature" in capsys.readouterr().out
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == "index,label,prediction,confidence,confidence_uncalibrated"


def test_predict_json_says_whether_probabilities_are_calibrated(calibrated_run, tmp_path, capsys):
    from PIL import Image

    from cifarlens.cli import main

    out, _ = calibrated_run
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    temperature = json.loads((out / "run.json").read_text())["calibration"]["temperature"]
    assert main(["predict", str(out), str(image), "--json"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert answer["calibrated"] is True and answer["temperature"] == temperature
    assert main(["predict", str(out), str(image), "--json", "--no-calibration"]) == 0
    [raw] = json.loads(capsys.readouterr().out)
    assert raw["calibrated"] is False and raw["temperature"] is None
    assert raw["top"][0]["label"] == answer["top"][0]["label"]
    assert main(["predict", str(out), str(image)]) == 0
    assert "calibrated probabilities (temperature scaling" in capsys.readouterr().out


def test_calibrate_command_refits_an_existing_run(calibrated_run, capsys):
    from cifarlens.cli import main

    out, _ = calibrated_run
    before = json.loads((out / "run.json").read_text())["calibration"]
    assert main(["calibrate", str(out), "--device", "cpu"]) == 0
    assert "temperature" in capsys.readouterr().out
    after = json.loads((out / "run.json").read_text())["calibration"]
    assert after["temperature"] == pytest.approx(before["temperature"], rel=1e-6)  # same weights, same data


def test_a_fit_on_few_images_that_stops_at_a_limit_says_both(calibrated_run, tmp_path, monkeypatch):
    """Only the few images were named; the temperature pinned at 20 went unsaid (and train has no
    --no-calibration, which the warning offered it)."""
    import shutil

    import cifarlens.evaluation as evaluation

    out = tmp_path / "run"
    shutil.copytree(calibrated_run[0], out)
    real = evaluation.fit_temperature

    def pinned(logits, labels):
        from dataclasses import replace

        return replace(real(logits, labels), temperature=MAX_TEMPERATURE)

    monkeypatch.setattr(evaluation, "fit_temperature", pinned)
    lines = []
    evaluation.calibrate_run(out, device="cpu", log=lines.append)
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert f"validation images and the temperature stopped at its limit {MAX_TEMPERATURE:g}" in warning
    assert "evaluate, predict and serve --no-calibration" in warning


@pytest.mark.slow  # ~5 s; CI runs it with the slow set
def test_calibrate_says_when_the_runs_onnx_holds_another_temperature(calibrated_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import shutil

    from cifarlens.cli import main
    from cifarlens.export import export_onnx

    out = tmp_path / "run"
    shutil.copytree(calibrated_run[0], out)
    export_onnx(out, out / "model.onnx", images=[], calibrated=False)  # a graph without the temperature
    assert main(["calibrate", str(out), "--device", "cpu"]) == 0
    assert f"note: {out / 'model.onnx'} holds the temperature before" in capsys.readouterr().out
    export_onnx(out, images=[])  # with it: nothing to say
    assert main(["calibrate", str(out), "--device", "cpu"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_training_with_calibration_off_records_none(tmp_path):
    from conftest import train_tiny_cifar10

    from cifarlens.api import load_run

    out, _ = train_tiny_cifar10(tmp_path, "--set", "train.calibrate=false")
    assert "calibration" not in json.loads((out / "run.json").read_text())
    assert not load_run(out).calibrated


@pytest.mark.slow  # ~8 s of ONNX export; CI runs it with the slow set (test_export covers export by default)
def test_onnx_export_puts_the_temperature_in_the_graph(calibrated_run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from cifarlens.api import load_run
    from cifarlens.export import export_onnx, onnx_is_current, onnx_metadata, onnx_session, run_onnx

    out, data = calibrated_run
    run = load_run(out)
    path, _ = export_onnx(out, tmp_path / "cal.onnx", images=[])
    meta = onnx_metadata(path)
    assert meta["calibration"] == {"calibrated": True, "temperature": run.temperature}
    assert onnx_is_current(out, path, run.temperature) and not onnx_is_current(out, path, None)
    x = run.preprocess(run.data(str(data)).test.images[:4])
    got = torch.from_numpy(run_onnx(onnx_session(path), x.numpy()))
    with torch.no_grad():
        want = run.model(x) / run.temperature
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    raw_path, _ = export_onnx(out, tmp_path / "raw.onnx", images=[], calibrated=False)
    assert onnx_metadata(raw_path)["calibration"]["calibrated"] is False


def test_safetensors_export_without_calibration_leaves_the_calibrated_export(calibrated_run, tmp_path):
    """--no-calibration of a calibrated run wrote export/model.safetensors and model.json again, without
    the temperature: the calibrated export's description was lost (ONNX already kept the two apart)."""
    import shutil

    from cifarlens.cli import main
    from cifarlens.export import load_exported

    run = tmp_path / "run"
    shutil.copytree(calibrated_run[0], run)  # the fixture is shared: a copy to write exports into
    assert main(["export", str(run), "--format", "safetensors"]) == 0
    assert main(["export", str(run), "--format", "safetensors", "--no-calibration"]) == 0
    _, calibrated = load_exported(run / "export" / "model.safetensors")
    _, raw = load_exported(run / "export" / "model.uncalibrated.safetensors")
    assert calibrated["calibration"]["calibrated"] is True and raw["calibration"]["calibrated"] is False
    assert (run / "export" / "model.uncalibrated.json").is_file()
