"""``cifarlens robustness``: the CIFAR-10-C protocol on generated corruptions and on official .npy files,
the corruption errors (mCE, relative mCE) and the report's reuse of the result."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from conftest import train_tiny_cifar10

from cifarlens.cli import main
from cifarlens.report.cifar_c import RESULT_FILE, corruption_errors, grid_text
from cifarlens.report.robustness import RobustnessTable
from cifarlens.runfiles import remove_run_files


def table(errors: dict[str, list[float]], clean_error: float, **kw) -> RobustnessTable:
    rows = [{"corruption": c, "severity": s + 1, "parameter": 0, "unit": "", "accuracy": 1 - e}
            for c, es in errors.items() for s, e in enumerate(es)]
    return RobustnessTable(clean_accuracy=1 - clean_error, num_images=100, total_images=100,
                           severities=[1, 2], rows=rows, **kw)


def test_corruption_errors_follow_the_paper():
    ref = table({"gaussian_noise": [0.4, 0.6], "fog": [0.2, 0.2]}, clean_error=0.1)
    same = corruption_errors(ref, ref)
    assert same["mce"] == pytest.approx(1.0) and same["relative_mce"] == pytest.approx(1.0)
    better = table({"gaussian_noise": [0.2, 0.3], "fog": [0.1, 0.1]}, clean_error=0.05)
    e = corruption_errors(better, ref)
    # CE = sum of errors / the reference's: 0.5 / 1.0 and 0.2 / 0.4
    assert e["per_corruption"]["gaussian_noise"]["ce"] == pytest.approx(0.5)
    assert e["per_corruption"]["fog"]["ce"] == pytest.approx(0.5)
    # relative CE: (0.15 + 0.25) / (0.3 + 0.5) and (0.05 + 0.05) / (0.1 + 0.1)
    assert e["per_corruption"]["gaussian_noise"]["relative_ce"] == pytest.approx(0.5)
    assert e["per_corruption"]["fog"]["relative_ce"] == pytest.approx(0.5)
    assert e["mce"] == pytest.approx(0.5) and e["corruptions"] == ["gaussian_noise", "fog"]


def test_a_relative_ce_the_reference_gives_nothing_to_divide_by_is_left_out_and_said_so():
    """fog does not hurt the reference (its errors equal the clean error): its relative CE is
    undefined, shown as n/a, and the relative mCE is the mean over the others (not NaN)."""
    from cifarlens.report.cifar_c import format_result

    ref = table({"gaussian_noise": [0.4, 0.6], "fog": [0.1, 0.1]}, clean_error=0.1)
    e = corruption_errors(ref, ref)
    assert math.isnan(e["per_corruption"]["fog"]["relative_ce"])
    assert e["relative_mce"] == pytest.approx(1.0) and e["mce"] == pytest.approx(1.0)
    text = format_result(ref, e)
    assert "relative mCE 100.0%" in text and "n/a" in text and "left out of the relative mCE" in text


def test_repeated_severities_and_corruptions_count_once(tiny_run, capsys):
    """--severities 3,3 once counted each image twice (accuracies up to 200 %)."""
    base = ["robustness", str(tiny_run), "--images", "20", "--device", "cpu"]
    assert main([*base, "--severities", "3", "--corruptions", "contrast"]) == 0
    once = json.loads((tiny_run / RESULT_FILE).read_text())["table"]["rows"]
    assert main([*base, "--severities", "3,3", "--corruptions", "contrast,contrast"]) == 0
    twice = json.loads((tiny_run / RESULT_FILE).read_text())["table"]["rows"]
    assert twice == once and len(once) == 1 and 0 <= once[0]["accuracy"] <= 1
    capsys.readouterr()


def test_a_result_that_measured_more_is_kept_not_replaced(tiny_run, tmp_path, capsys):
    """A quick check of one corruption replaced a result of all of them, without a word."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    base = ["robustness", str(run), "--images", "20", "--device", "cpu", "--severities", "3"]
    assert main([*base, "--corruptions", "contrast,fog"]) == 0
    wide = (run / RESULT_FILE).read_text()
    capsys.readouterr()
    assert main([*base, "--corruptions", "fog"]) == 0
    assert "measured 1 cell(s) more (contrast at severity 3), which this one does not: kept as " \
           "robustness.previous.json" in capsys.readouterr().out
    assert (run / "robustness.previous.json").read_text() == wide
    assert main([*base, "--corruptions", "fog"]) == 0  # the same again: replaced, nothing kept
    assert "kept as" not in capsys.readouterr().out and (run / "robustness.previous.json").read_text() == wide
    # a third check of another corruption: the fog result goes to previous, and the wide one it pushes
    # out measured contrast, which fog did not: kept too (it was overwritten)
    fog = (run / RESULT_FILE).read_text()
    assert main([*base, "--corruptions", "contrast"]) == 0
    assert "kept as robustness.previous.2.json" in capsys.readouterr().out
    assert (run / "robustness.previous.json").read_text() == fog
    assert (run / "robustness.previous.2.json").read_text() == wide
    remove_run_files(run)  # what --force removes: the numbered ones too
    assert not list(run.glob("robustness.previous*"))


def test_corruption_errors_refuse_a_reference_measured_differently():
    from cifarlens.errors import CifarlensError

    a = table({"fog": [0.2, 0.3]}, 0.1)
    b = table({"fog": [0.2, 0.3]}, 0.1, source="official files in /x")
    with pytest.raises(CifarlensError, match="evaluated differently"):
        corruption_errors(a, b)
    from cifarlens.report.cifar_c import check_reference  # the severities in another order: the same protocol

    check_reference(a, source=a.source, num_images=100, severities=[2, 1], seed=a.seed)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_cifar10(tmp_path_factory.mktemp("protocol"))[0]


def write_official(folder, images_nhwc: np.ndarray, labels: np.ndarray, corruptions: dict) -> None:
    """The CIFAR-10-C layout: labels.npy (5 x N) and <name>.npy (5 x N, 32, 32, 3) uint8, severity 1 first.
    ``corruptions`` maps a name to a function (images, severity) -> images."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "labels.npy", np.tile(labels.astype(np.int64), 5))
    for name, fn in corruptions.items():
        np.save(folder / f"{name}.npy", np.concatenate([fn(images_nhwc, s) for s in range(1, 6)]).astype(np.uint8))


def test_official_files_give_the_clean_accuracy_when_they_hold_the_clean_images(tiny_run, tmp_path, capsys):
    from cifarlens.api import load_run

    run = load_run(tiny_run)
    test = run.data().test
    images = test.images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3)
    black = lambda x, s: np.zeros_like(x) if s == 5 else x  # noqa: E731 (severity 5 wipes the images out)
    write_official(tmp_path / "c10c", images, test.labels.numpy(), {"fog": lambda x, s: x, "contrast": black})
    assert main(["robustness", str(tiny_run), "--corruptions-dir", str(tmp_path / "c10c"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "official files in" in out and "mean corruption accuracy" in out
    result = json.loads((tiny_run / RESULT_FILE).read_text())["table"]
    clean = result["clean_accuracy"]
    rows = {(r["corruption"], r["severity"]): r for r in result["rows"]}
    assert set(rows) == {(c, s) for c in ("fog", "contrast") for s in range(1, 6)}
    assert all(rows[("fog", s)]["accuracy"] == pytest.approx(clean) for s in range(1, 6))  # untouched images
    assert rows[("contrast", 5)]["accuracy"] == pytest.approx(max(rows[("contrast", 5)]["per_class"]) / 10, abs=0.2)
    assert len(rows[("fog", 1)]["per_class"]) == 10 and result["classes"] == list(run.classes)
    # the protocol's 13 others are named as left out (only "over 2 corruptions" hinted at it)
    assert len(result["unavailable"]) == 13 and result["unavailable"]["frost"] == f"no frost.npy in {tmp_path / 'c10c'}"
    assert re.search(r"frost +left out: no frost.npy in", out), out
    # names longer than the measured ones ran into their note ("elastic_transformleft out")
    assert re.search(r"elastic_transform +left out: no elastic_transform.npy in", out), out


def test_a_truncated_or_foreign_npy_is_a_one_line_error(tiny_run, tmp_path, capsys):
    from cifarlens.api import load_run

    test = load_run(tiny_run).data().test
    folder = tmp_path / "c10c"
    write_official(folder, test.images.permute(0, 2, 3, 1).numpy(), test.labels.numpy(), {"fog": lambda x, s: x})
    path = folder / "fog.npy"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert main(["robustness", str(tiny_run), "--corruptions-dir", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fog.npy" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["robustness", str(tiny_run), "--corruptions-dir", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "no such CIFAR-C folder" in capsys.readouterr().err
    # labels of another dataset within the run's range (CIFAR-10-C's 0..9 for a CIFAR-100 run) were scored
    few = tmp_path / "few"
    write_official(few, test.images.permute(0, 2, 3, 1).numpy(), test.labels.numpy() % 4, {"fog": lambda x, s: x})
    assert main(["robustness", str(tiny_run), "--corruptions-dir", str(few), "--device", "cpu"]) == 2
    assert f"{few}'s labels name 4 classes, the run has 10: files made for another dataset" in capsys.readouterr().err


@pytest.mark.slow  # ~5-7 s; CI runs it with the slow set (the default suite passed 7 minutes)
def test_generated_protocol_with_a_reference_gives_mce_and_the_report_reuses_it(tiny_run, tmp_path, capsys):
    import shutil

    from cifarlens.api import load_run
    from cifarlens.report import build_report_data
    from cifarlens.report.html import render_report

    flags = ["--corruptions", "gaussian_noise,defocus_blur,contrast", "--severities", "1,5", "--images", "30",
             "--device", "cpu"]
    assert main(["robustness", str(tiny_run), *flags]) == 0
    first = json.loads((tiny_run / RESULT_FILE).read_text())["table"]
    assert first["num_images"] == 30 and first["source"].startswith("generated")
    reference = tmp_path / "reference.json"
    shutil.copy(tiny_run / RESULT_FILE, reference)
    capsys.readouterr()
    assert main(["robustness", str(tiny_run), *flags, "--reference", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "mCE 100.0%, relative mCE" in out  # the same run, the same seeded corruptions: as robust as itself
    again = json.loads((tiny_run / RESULT_FILE).read_text())
    assert again["table"]["rows"] == first["rows"]  # seeded: the same numbers
    assert again["corruption_errors"]["mce"] == pytest.approx(1.0)
    # a reference measured on other images is refused before any work
    assert main(["robustness", str(tiny_run), *flags[:4], "--images", "20", "--device", "cpu",
                 "--reference", str(reference)]) == 2
    assert "evaluated differently" in capsys.readouterr().err
    # the report shows the saved protocol while it is newer than the weights
    run = load_run(tiny_run)
    data = build_report_data(run, gradcam=False)
    assert data.robustness.num_images == 30 and "cifarlens robustness" in data.robustness_note
    assert f"Against the reference {reference}: mCE 100.0%, relative mCE" in data.robustness_note  # it was left out
    assert data.robustness_errors["contrast"][0] == pytest.approx(1.0)  # each corruption's CE, a table column
    assert set(data.robustness_errors) == {"gaussian_noise", "defocus_blur", "contrast"}
    page = render_report(data)
    assert "<th>relative CE</th>" in page and "100.0%" in page.split("Robustness to common corruptions")[-1]
    # no relative mCE (a reference whose accuracy no corruption lowered): the mCE note was dropped whole
    saved = json.loads((tiny_run / RESULT_FILE).read_text())
    saved["corruption_errors"]["relative_mce"] = None
    saved["corruption_errors"]["per_corruption"]["contrast"]["relative_ce"] = None
    stamp = (tiny_run / RESULT_FILE).stat().st_mtime
    (tiny_run / RESULT_FILE).write_text(json.dumps(saved))
    os.utime(tiny_run / RESULT_FILE, (stamp, stamp))
    data = build_report_data(run, gradcam=False)
    assert "mCE 100.0%, relative mCE n/a over 3 corruption(s)" in data.robustness_note
    assert math.isnan(data.robustness_errors["contrast"][1]) and "n/a" in render_report(data)
    asked = build_report_data(run, gradcam=False, robustness=True, max_robustness_images=20)  # it was ignored
    assert asked.robustness.num_images == 20 and "cifarlens robustness" not in asked.robustness_note
    assert data.robustness_classes_png is not None
    later = (tiny_run / RESULT_FILE).stat().st_mtime + 10
    os.utime(tiny_run / "model.safetensors", (later, later))
    data = build_report_data(run, gradcam=False, max_robustness_images=40)
    assert "cifarlens robustness" not in data.robustness_note and data.robustness.num_images == 40


@pytest.mark.parametrize("flags, message", [
    (["--severities", "0,6"], "--severities must lie in 1..5"),
    (["--severities", "a"], "comma-separated integers"),
    (["--severities", ","], "comma-separated integers"),
    (["--corruptions", "rain"], "unknown corruption 'rain'"),
    (["--images", "0"], "--images must be >= 1"),
    (["--reference", "/nonexistent"], "--reference /nonexistent does not exist"),
])
def test_bad_flags_are_one_line_errors(tiny_run, capsys, flags, message):
    assert main(["robustness", str(tiny_run), "--device", "cpu", *flags]) == 2
    assert message in capsys.readouterr().err


def test_per_class_accuracies_show_which_class_breaks(tiny_run):
    from cifarlens.api import load_run
    from cifarlens.report.cifar_c import evaluate_generated, format_result

    run = load_run(tiny_run)
    t = evaluate_generated(run, run.data().test, severities=(5,), corruptions=["contrast"], max_images=None)
    counts = torch.tensor(t.class_counts)
    overall = sum(a * c for a, c in zip(t.rows[0]["per_class"], t.class_counts)) / counts.sum()
    assert overall == pytest.approx(t.rows[0]["accuracy"])  # per-class accuracies weigh up to the total
    assert "largest drop: class" in format_result(t)


def test_frost_is_left_out_with_a_reason_when_its_photographs_are_not_installed(tiny_run, monkeypatch, capsys):
    import cifarlens.corruptions.weather as W
    from cifarlens.api import load_run
    from cifarlens.report.robustness import robustness

    monkeypatch.setattr(W, "frost_folder", lambda: None)
    W.frost_textures.cache_clear()  # (photographs read by an earlier test)
    run = load_run(tiny_run)
    t = robustness(run, run.data().test, (1,), max_images=10)
    assert "frost" not in t.corruptions() and len(t.corruptions()) == 14
    assert "cifarlens[corruptions]" in t.unavailable["frost"]
    # asked for by name, it fails with its own one-line message
    assert main(["robustness", str(tiny_run), "--corruptions", "frost", "--images", "10", "--device", "cpu"]) == 2
    assert "pip install 'cifarlens[corruptions]'" in capsys.readouterr().err


def test_the_grid_is_counted_in_words_that_agree_with_the_numbers():
    assert grid_text(15, 5) == "15 corruptions x 5 severities"
    assert grid_text(1, 1) == "1 corruption x 1 severity"


def test_a_reference_of_another_protocol_is_refused_before_the_evaluation(tiny_run, tmp_path, monkeypatch, capsys):
    """It was refused only after the whole evaluation, whose result was then thrown away."""
    from cifarlens.report import cifar_c

    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"table": table({"contrast": [0.2, 0.3]}, 0.1, source=cifar_c.GENERATED).as_dict()}))

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated before the reference was checked")

    monkeypatch.setattr(cifar_c, "evaluate_generated", must_not_run)
    base = ["robustness", str(tiny_run), "--device", "cpu", "--severities", "1,2", "--reference", str(reference)]
    assert main([*base, "--images", "30"]) == 2  # the reference has 100 images
    assert "evaluated differently" in capsys.readouterr().err
    assert main([*base, "--images", "100", "--corruptions", "fog"]) == 2  # 50 test images: 50 of them
    assert "evaluated differently" in capsys.readouterr().err
    bigger = table({"contrast": [0.2, 0.3]}, 0.1, source=cifar_c.GENERATED)
    bigger.num_images = 50
    reference.write_text(json.dumps({"table": bigger.as_dict()}))
    assert main([*base, "--corruptions", "fog"]) == 2  # no corruption in common
    assert "none of the corruptions asked for (fog; it has contrast)" in capsys.readouterr().err


def test_the_mce_says_when_it_covers_only_the_corruptions_both_runs_share():
    from cifarlens.report.cifar_c import format_result

    ours = table({"gaussian_noise": [0.4, 0.6], "brightness": [0.2, 0.2]}, 0.1)
    ref = table({"gaussian_noise": [0.4, 0.6], "contrast": [0.3, 0.3]}, 0.1)
    text = format_result(ours, corruption_errors(ours, ref))
    assert "mCE 100.0%, relative mCE 100.0% against the reference over the 1 corruption both runs were evaluated " \
           "on (gaussian_noise)" in text
    assert "over the" not in format_result(ref, corruption_errors(ref, ref))


def test_the_largest_drop_leaves_out_classes_without_images_and_classes_that_lost_nothing():
    from cifarlens.report.cifar_c import _weakest_class
    from cifarlens.report.figures import robustness_class_heatmap

    t = table({"fog": [0.5, 0.5]}, 0.2, classes=["cat", "dog", "owl"], class_counts=[0, 3, 2],
              clean_per_class=[0.0, 1.0, 0.5])
    for row in t.rows:
        row["per_class"] = [0.0, 0.8, 0.5]  # cat: no images; dog loses 20 points; owl nothing
    assert _weakest_class(t) == ("largest drop: class dog, 100.00% clean -> 80.00% under corruption (3 images; "
                                 "per-class accuracies in robustness.json)")
    for row in t.rows:
        row["per_class"] = [0.0, 1.0, 0.5]
    assert _weakest_class(t) == ""  # nobody lost anything: no "largest drop" of 0 points
    assert robustness_class_heatmap(t)[:8] == b"\x89PNG\r\n\x1a\n"  # the absent class drawn blank, not at 0


def test_official_files_refuse_a_run_that_takes_other_images(tmp_path):
    """A Fashion-MNIST run (1 x 28 x 28) fed the 32 x 32 RGB files crashed in its first convolution."""
    from types import SimpleNamespace

    from cifarlens.errors import CifarlensError
    from cifarlens.report.cifar_c import official_files

    folder = tmp_path / "c10c"
    write_official(folder, np.zeros((10, 32, 32, 3), np.uint8), np.arange(10), {"fog": lambda x, s: x})
    run = SimpleNamespace(path=tmp_path / "fm", classes=[str(k) for k in range(10)],
                          info=SimpleNamespace(in_channels=1, image_size=28))
    with pytest.raises(CifarlensError, match=r"takes 1 x 28 x 28 images; the CIFAR-C files hold 3 x 32 x 32"):
        official_files(run, folder)
    run.info = SimpleNamespace(in_channels=3, image_size=32)
    source, cdir = official_files(run, folder)
    assert source == f"official files in {folder}" and cdir.per_severity == 10


def test_files_that_are_not_the_runs_test_set_say_so_and_write_json_without_nan(tiny_run, tmp_path, capsys):
    from cifarlens.api import load_run
    from cifarlens.report.cifar_c import load_reference

    test = load_run(tiny_run).data().test
    folder = tmp_path / "c10c"
    shuffled = np.roll(test.labels.numpy(), 1)  # valid labels, not the test split's order
    write_official(folder, test.images.permute(0, 2, 3, 1).numpy(), shuffled, {"fog": lambda x, s: x})
    assert main(["robustness", str(tiny_run), "--corruptions-dir", str(folder), "--severities", "1",
                 "--device", "cpu"]) == 0
    assert "clean accuracy not measured (the files' labels are not the run's test labels in order" in \
        capsys.readouterr().out
    text = (tiny_run / RESULT_FILE).read_text()
    assert "NaN" not in text and json.loads(text)["table"]["clean_accuracy"] is None  # standard JSON
    assert math.isnan(load_reference(tiny_run).clean_accuracy)  # and it reads back
    (folder / "labels.npy").write_text("hello world")
    assert main(["robustness", str(tiny_run), "--corruptions-dir", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not a .npy file (no NumPy header)" in err and "allow_pickle" not in err


def test_an_empty_corruption_list_is_refused_before_the_evaluation(tiny_run, capsys):
    assert main(["robustness", str(tiny_run), "--corruptions", ",", "--device", "cpu"]) == 2
    assert "--corruptions expects comma-separated names" in capsys.readouterr().err


def test_other_test_images_are_measured_apart_and_a_reference_of_other_images_is_refused(tiny_run, tmp_path, capsys):
    """robustness --data-dir OTHER wrote RUN/robustness.json, which the report then showed as the run's own;
    a CIFAR-100 run's result was taken as a CIFAR-10 run's mCE reference."""
    from conftest import make_cifar10

    flags = ["--corruptions", "contrast", "--severities", "1", "--images", "20", "--device", "cpu"]
    assert main(["robustness", str(tiny_run), *flags]) == 0
    own = (tiny_run / RESULT_FILE).read_bytes()
    recorded = json.loads(own)["data"]
    assert recorded["test_fingerprint"] == json.loads((tiny_run / "run.json").read_text())["data_fingerprint"]["test"]
    other = make_cifar10(tmp_path / "other", n_train_per_batch=40, n_test=50, seed=1).data_dir
    with pytest.warns(UserWarning, match="test images are not those"):
        assert main(["robustness", str(tiny_run), *flags, "--data-dir", str(other)]) == 0
    assert (tiny_run / RESULT_FILE).read_bytes() == own  # the run's own result stays
    [apart] = (tiny_run / "other-data").glob(f"test-*/{RESULT_FILE}")
    theirs = json.loads(apart.read_text())["data"]
    assert apart.parent.name == f"test-{theirs['test_fingerprint']}" != f"test-{recorded['test_fingerprint']}"
    capsys.readouterr()
    assert main(["robustness", str(tiny_run), *flags, "--reference", str(apart)]) == 2
    assert "was measured on other test images than these" in capsys.readouterr().err
    foreign = tmp_path / "cifar100.json"  # another dataset's result
    foreign.write_text(json.dumps(json.loads(own) | {"data": {**recorded, "classes": [f"c{i}" for i in range(100)]}}))
    assert main(["robustness", str(tiny_run), *flags, "--reference", str(foreign)]) == 2
    assert "was measured on another dataset (its 100 classes are not this run's 10)" in capsys.readouterr().err
    assert main(["robustness", str(tiny_run), *flags, "--reference", str(tiny_run)]) == 0  # its own: mCE 100 %
    assert "mCE 100.0%" in capsys.readouterr().out
    from cifarlens.api import load_run
    from cifarlens.report import build_report_data
    from cifarlens.report.html import _robustness

    later = (tiny_run / "model.safetensors").stat().st_mtime + 20  # newer than the weights (an earlier test moved them on)
    os.utime(tiny_run / RESULT_FILE, (later, later))
    section = _robustness(build_report_data(load_run(tiny_run), gradcam=False))  # the saved result, one corruption
    assert "One corruption of the CIFAR-10-C protocol" in section and "1 corruptions" not in section
