"""CIFAR-10/100 read from image-folder copies (PNG/JPEG folders), on small copies the tests write."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import TINY, make_cifar10, save_image, synthetic_images

from cifarlens.cli import main
from cifarlens.data import load_dataset
from cifarlens.data.cifar import CIFAR10, CIFAR10_INFO, CIFAR100_INFO
from cifarlens.data.cifar_folder import read_folder_copy
from cifarlens.errors import CifarlensError

C10 = CIFAR10_INFO.classes


def write_copy(root: Path, classes=C10, n_train: int = 3, n_test: int = 2, n_val: int = 0, fmt: str = "png",
               names=None, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ``root/{train,test[,val]}/<folder>/NNNN.<ext>``; returns {split: (images (N,3,32,32), labels)}
    in the order the reader returns them (official label order, then file name)."""
    rng = np.random.default_rng(seed)
    names = names or classes
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("val", n_val)):
        if not n:
            continue
        images, labels = [], []
        for label, folder in enumerate(names):
            for j in range(n):
                img = synthetic_images(np.array([label]), 3, 32, 32, rng)[0]  # (3, 32, 32)
                path = save_image(root / split / folder / f"{j:04d}", img.transpose(1, 2, 0), fmt)
                if fmt == "jpeg":  # what the reader sees is the decoded JPEG, not the array written
                    from PIL import Image

                    img = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
                images.append(img)
                labels.append(label)
        out[split] = (np.stack(images), np.array(labels))
    return out


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_png_copy_reads_as_cifar10_with_official_facts(tmp_path):
    written = write_copy(tmp_path, n_val=1)
    before = tree_state(tmp_path)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.info.name == "cifar10" and ds.info.classes == C10
    assert (ds.info.mean, ds.info.std) == (CIFAR10_INFO.mean, CIFAR10_INFO.std)  # official, not computed
    for split in ("train", "test", "val"):
        got = getattr(ds, split)
        np.testing.assert_array_equal(got.images.numpy(), written[split][0])  # exact pixels, channel order kept
        np.testing.assert_array_equal(got.labels.numpy(), written[split][1])
        assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64
        assert len(got.files) == len(got) and all((tmp_path / f).is_file() for f in got.files)  # for predictions.csv
        assert {f.split("/")[0] for f in got.files} == {split}
    assert ds.source.kind == "image folder copy" and ds.source.formats == ("PNG",) and not ds.source.lossy
    assert ds.source.label(ds.info) == "CIFAR-10 (PNG copy)"
    # 3+1 train/val and 2 test images per class are far from 5,000 / 1,000: warned, with the counts
    assert len(ds.source.warnings) == 2
    assert "train/ + val/ has 40 images, the official split 50,000" in ds.source.warnings[0]
    assert "test/ has 20 images, the official split 10,000" in ds.source.warnings[1]
    assert tree_state(tmp_path) == before  # nothing written, nothing changed


def test_jpeg_copy_is_recorded_as_lossy(tmp_path):
    write_copy(tmp_path, fmt="jpeg")
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.source.lossy and ds.source.formats == ("JPEG",)
    assert ds.source.label(ds.info) == "CIFAR-10 (JPEG copy)"


def test_a_class_folder_linked_into_another_is_refused(tmp_path):
    write_copy(tmp_path)
    (tmp_path / "train" / "cat" / "dogs").symlink_to(tmp_path / "train" / "dog", target_is_directory=True)
    with pytest.raises(CifarlensError, match="are one file, reached through a link"):
        load_dataset("cifar10", tmp_path, download=False)


def test_official_counts_give_no_warning(tmp_path):
    write_copy(tmp_path, n_train=2, n_test=1)
    _, _, val, source = read_folder_copy(tmp_path, CIFAR10_INFO, "CIFAR-10", train_per_class=2, test_per_class=1)
    assert val is None and source.warnings == ()


def test_folder_names_match_case_and_separators_and_follow_official_order(tmp_path):
    # "Truck", "AIRPLANE", "aquarium fish": matched to the official names; labels follow the
    # official order even though sorted folder names would put them elsewhere
    names = [c.upper() if i % 2 else c.capitalize() for i, c in enumerate(C10)]
    written = write_copy(tmp_path, names=names)
    ds = load_dataset("cifar10", tmp_path, download=False)
    np.testing.assert_array_equal(ds.train.labels.numpy(), written["train"][1])
    np.testing.assert_array_equal(ds.train.images.numpy(), written["train"][0])
    c100 = tmp_path / "c100"
    names100 = [c.replace("_", " ") for c in CIFAR100_INFO.classes]  # "aquarium fish", "maple tree"
    write_copy(c100, classes=CIFAR100_INFO.classes, names=names100, n_train=1, n_test=1)
    ds = load_dataset("cifar100", c100, download=False)
    assert ds.info.num_classes == 100 and ds.train.labels.tolist() == list(range(100))
    assert ds.source.label(ds.info) == "CIFAR-100 (PNG copy)"


def test_numeric_folders_are_label_indices(tmp_path):
    written = write_copy(tmp_path, names=[str(i) for i in range(10)])
    ds = load_dataset("cifar10", tmp_path, download=False)
    np.testing.assert_array_equal(ds.test.images.numpy(), written["test"][0])
    assert ds.test.labels.tolist() == written["test"][1].tolist()


def test_official_files_are_preferred_over_a_copy(tmp_path):
    make_cifar10(tmp_path, n_train_per_batch=10, n_test=10)
    write_copy(tmp_path)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.source.kind == "official files" and len(ds.train) == 50


def test_val_may_hold_a_subset_of_the_classes(tmp_path):
    write_copy(tmp_path)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    save_image(tmp_path / "val" / "cat" / "0000", np.zeros((32, 32, 3), np.uint8), "png")
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.val.labels.tolist() == [C10.index("cat")]


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "train" / "kitten").mkdir(),
     r"train: folder 'kitten' is not a CIFAR-10 class, so this is not a CIFAR-10 copy; expected the 10 official "
     r"class folders: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck"),
    (lambda root: [p.unlink() for p in (root / "test" / "cat").iterdir()] and (root / "test" / "cat").rmdir(),
     r"test: no folder for CIFAR-10 class 'cat'; expected the 10 official class folders: airplane, "),
    (lambda root: (root / "train" / "Cat").mkdir(),
     r"folders 'Cat' and 'cat' are both class 'cat'"),
    (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()],
     r"class folder .*train/dog has no images"),
])
def test_not_a_cifar_copy_is_a_one_line_error(tmp_path, change, message):
    write_copy(tmp_path)
    change(tmp_path)
    before = tree_state(tmp_path)
    with pytest.raises(CifarlensError, match=message) as err:
        load_dataset("cifar10", tmp_path, download=False)
    assert "\n" not in str(err.value)
    assert tree_state(tmp_path) == before


def test_wrong_image_size_names_the_file(tmp_path):
    write_copy(tmp_path)
    save_image(tmp_path / "train" / "frog" / "big", np.zeros((64, 48, 3), np.uint8), "png")
    with pytest.raises(CifarlensError, match=r"train/frog/big\.png is 48x64 pixels, but CIFAR-10 images are "
                                             r"32x32.*--dataset imagefolder"):
        load_dataset("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("fmt", ["EPS", "ICO"])
def test_a_copy_opens_only_the_formats_every_reader_opens(tmp_path, monkeypatch, fmt):
    """The copy's reader opened any format Pillow knows: an EPS file named .png ran Ghostscript (a
    32x32 one would have been trained on), an ICO named .png was read as an image."""
    from conftest import fake_ghostscript

    write_copy(tmp_path)
    marker = fake_ghostscript(tmp_path, monkeypatch)
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / "cat" / "evil.png", format=fmt)
    with pytest.raises(CifarlensError, match=r"train/cat/evil\.png.*not an image in a format cifarlens reads"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()  # no interpreter ran


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_image_names_the_file(tmp_path, damage):
    write_copy(tmp_path, fmt="jpeg")
    victim = tmp_path / "test" / "ship" / "0001.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a jpeg at all")
    with pytest.raises(CifarlensError, match=r"cannot read image .*test/ship/0001\.jpg") as err:
        load_dataset("cifar10", tmp_path, download=False)
    assert "\n" not in str(err.value)


def test_missing_data_mentions_the_copy_layout(tmp_path):
    with pytest.raises(CifarlensError, match=r"image-folder copy \(train/<class>/, test/<class>/\)"):
        load_dataset("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("layout", ["no test/", "a split folder", "a CIFAR-100 split folder"])
def test_a_partial_copy_is_refused_and_nothing_is_downloaded_into_it(tmp_path, layout, monkeypatch):
    """Downloading would put the official files into the user's folder and train on them instead.
    (CIFAR-100 has a class "train": its split folder was said to have "train/ but no test/".)"""
    import cifarlens.data.cifar as cifar

    monkeypatch.setattr(cifar, "_download", lambda *a: pytest.fail("a download was attempted"))
    c100 = layout == "a CIFAR-100 split folder"
    write_copy(tmp_path / "copy", classes=CIFAR100_INFO.classes if c100 else C10, n_train=1, n_test=0)
    data_dir = tmp_path / "copy" if layout == "no test/" else tmp_path / "copy" / "train"
    before = tree_state(tmp_path)
    message = (r"has train/ but no test/" if layout == "no test/" else
               r"holds class folders \(apple, aquarium_fish, baby, ...\)" if c100 else
               r"holds class folders \(airplane, automobile, bird, ...\)")
    with pytest.raises(CifarlensError, match=message):
        load_dataset("cifar100" if c100 else "cifar10", data_dir, download=True)
    assert tree_state(tmp_path) == before


@pytest.mark.slow  # ~5-7 s; CI runs it with the slow set (the default suite passed 7 minutes)
def test_a_run_on_a_copy_checks_its_data_before_using_it(tmp_path, monkeypatch, capsys):
    """evaluate, calibrate and explain read the run's data again: never a download in place of a
    moved copy, never a validation split carved from changed training images (it would hold
    images the run trained on), and a warning for other test images."""
    import shutil

    import cifarlens.data.cifar as cifar

    monkeypatch.setattr(cifar, "_download", lambda *a: pytest.fail("a download was attempted"))
    data, out = tmp_path / "copy", tmp_path / "run"
    write_copy(data, n_train=6, n_test=2)
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--epochs", "1", "--no-report",
                 "--out", str(out), *TINY]) == 0
    assert set(json.loads((out / "run.json").read_text())["data_fingerprint"]) == {"train", "train_labels", "test", "test_labels"}
    assert main(["evaluate", str(out), "--split", "val"]) == 0

    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is not in {data} any more (moved or deleted?); pass --data-dir" in err and not data.exists()
    (tmp_path / "moved").rename(data)

    extra = data / "train" / "cat" / "0000.png"
    shutil.copy(extra, extra.with_name("extra.png"))
    for command in (["evaluate", str(out), "--split", "val"], ["calibrate", str(out)],
                    ["explain", str(out), "--split", "val", "--indices", "0", "--out", str(tmp_path / "cams")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "the training images are not those" in err and "61 images now, 60 then" in err, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["evaluate", str(out)]) == 0  # the test split is the run's own: no warning

    extra.with_name("extra.png").unlink()
    # the same images decoded otherwise (here: a pixel of each changed by one grey level): the run's own
    import numpy as np
    from PIL import Image

    originals = {path: path.read_bytes() for path in sorted(data.glob("*/*/*.png"))}
    for path in originals:
        pixels = np.array(Image.open(path))
        pixels[0, 0, 0] = pixels[0, 0, 0] + 1 if pixels[0, 0, 0] < 255 else 254
        Image.fromarray(pixels).save(path)
    for split in ("val", "test"):
        with pytest.warns(UserWarning, match=r"the (training|test) images' pixels differ a little .* decoded otherwise"):
            assert main(["evaluate", str(out), "--split", split]) == 0
    assert not (out / "other-data").exists()
    for path, content in originals.items():
        path.write_bytes(content)

    # another test set of the same classes (here: one test image replaced): its figures apart
    metrics = (out / "metrics.json").read_bytes()
    shutil.copy(data / "test" / "dog" / "0000.png", data / "test" / "cat" / "0000.png")
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"the test images are not those .*\(1 of the 20 images are others\)"):
        assert main(["evaluate", str(out)]) == 0
    assert "not the run's own test images: written to " in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == metrics
    (other,) = (out / "other-data").iterdir()
    assert json.loads((other / "metrics.json").read_text())["data_dir"] == str(data)
    assert {p.name for p in other.iterdir()} == {"metrics.json", "predictions.csv", "classification_report.txt",
                                                  "confusion_matrix.png"}

    # the same labels over other images (files replaced or reordered within a class): the validation
    # split would hold training images of the run: refused; other training images only outside it: fine
    for path in sorted((data / "train" / "cat").glob("*.png")):
        shutil.copy(data / "train" / "dog" / path.name, path)
    for command in (["evaluate", str(out), "--split", "val"], ["calibrate", str(out)]):
        assert main(command) == 2, command
        assert "1 of the validation split's 10 images are not those it held" in capsys.readouterr().err


def test_resize_applies_to_every_split_of_a_copy(tmp_path):
    write_copy(tmp_path, n_val=1)
    ds = load_dataset("cifar10", tmp_path, download=False, image_size=40)
    assert ds.info.image_size == 40
    assert {tuple(s.images.shape[1:]) for s in (ds.train, ds.val, ds.test)} == {(3, 40, 40)}
    assert all(len(s.files) == len(s) for s in (ds.train, ds.val, ds.test))  # the file names stay


@pytest.mark.slow  # ~6 s; CI runs it with the slow set (the default suite's 7-minute budget)
def test_train_on_a_jpeg_copy_is_cifar10_in_the_run_and_report(tmp_path, capsys):
    """The user's path: --dataset cifar10 on a JPEG folder gives a run that knows it is CIFAR-10 (JPEG copy)."""
    data = tmp_path / "copy"
    write_copy(data, n_train=6, n_test=2, fmt="jpeg")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(data), "--epochs", "1", "--out", str(out),
                 *TINY]) == 0
    log = (out / "train.log").read_text()
    assert "on CIFAR-10 (JPEG copy)" in log and "warning: CIFAR-10 copy" in log
    meta = json.loads((out / "run.json").read_text())
    assert meta["source"]["label"] == "CIFAR-10 (JPEG copy)" and meta["source"]["lossy"] is True
    assert meta["dataset"]["mean"] == list(CIFAR10.info.mean)
    page = (out / "report.html").read_text()
    literature = re.search(r'<section id="literature">(.*?)</section>', page, re.DOTALL).group(1)
    assert "test accuracy on CIFAR-10 (JPEG copy)" in literature and "Deep Residual Learning" in literature
    assert "lossy compression (JPEG)" in literature
    # a copy of 60 training images is not the published split: the report says so beside those rows
    assert "What was read is not the official data as published: CIFAR-10 copy" in literature
    capsys.readouterr()
    assert main(["compare", str(out), str(out)]) == 0
    assert "CIFAR-10 (JPEG copy)" in capsys.readouterr().out
    webp = tmp_path / "webp"  # the note names the lossy format the copy holds
    write_copy(webp, n_train=6, n_test=2, fmt="webp")
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(webp), "--epochs", "1", "--out",
                 str(tmp_path / "run-webp"), *TINY]) == 0
    page = (tmp_path / "run-webp" / "report.html").read_text()
    assert "lossy compression (WEBP)" in re.search(r'<section id="literature">(.*?)</section>', page, re.DOTALL).group(1)


def test_a_run_pointed_at_other_classes_names_its_dataset_not_a_train_flag(tmp_path, capsys):
    """evaluate --data-dir with other class folders said "use --dataset imagefolder", which evaluate
    does not take."""
    write_copy(tmp_path / "copy")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "copy"), "--epochs", "1", "--no-report",
                 "--out", str(out), *TINY]) == 0
    write_copy(tmp_path / "other", names=["kitten", *C10[1:]])
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "folder 'kitten' is not a CIFAR-10 class" in err and "--dataset" not in err
    assert f"{out} was trained on cifar10: point --data-dir at that dataset" in err
