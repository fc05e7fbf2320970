"""Dataset readers on synthetic files in the official layouts, their errors, and channel_stats."""

from __future__ import annotations

import io
import os
import pickle
import re
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlens.data import DATASETS, list_datasets, load_dataset
from cifarlens.data import base, cifar, fashion_mnist
from cifarlens.data.cifar import CIFAR10, CIFAR100, NumpyOnlyUnpickler
from cifarlens.data.stats import channel_stats
from cifarlens.errors import CifarlensError
from conftest import (
    FASHION_CLASSES,
    IMAGE_FORMATS,
    make_cifar10,
    make_cifar100,
    make_cifar_archive,
    make_fashion_mnist,
    make_imagefolder,
    save_image,
    write_cifar_pickle,
    write_idx,
)

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def assert_split(split, images: np.ndarray | None, labels: np.ndarray) -> None:
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert split.images.is_contiguous()
    np.testing.assert_array_equal(split.labels.numpy(), labels)
    if images is not None:
        np.testing.assert_array_equal(split.images.numpy(), images)


def test_registry_lists_all_readers():
    assert {"cifar10", "cifar100", "fashion-mnist", "imagefolder"} <= set(list_datasets())
    assert list_datasets() == DATASETS.names()


def test_unknown_dataset_and_bad_image_size(tmp_path):
    with pytest.raises(CifarlensError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(CifarlensError, match="image size"):
        load_dataset("cifar10", tmp_path, image_size=0)


# ---------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py2", "str", "bytes"])
def test_cifar10_reads_official_layout(tmp_path, style):
    data = make_cifar10(tmp_path, n_train_per_batch=8, n_test=12, style=style)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.train.images.shape == (40, 3, 32, 32) and ds.test.images.shape == (12, 3, 32, 32)
    assert_split(ds.train, data.train_images, data.train_labels)
    assert_split(ds.test, data.test_images, data.test_labels)
    assert ds.info.classes == cifar.CIFAR10_INFO.classes
    assert ds.info.num_classes == 10 and ds.info.in_channels == 3 and ds.info.image_size == 32
    assert ds.info.mean == (0.4914, 0.4822, 0.4465) and ds.info.std == (0.2470, 0.2435, 0.2616)
    assert ds.val is None


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_the_extracted_folder_itself_is_read(tmp_path, dataset, monkeypatch):
    """--data-dir .../cifar-10-batches-py (not the folder above it) fell through to a download,
    which would have nested the official files inside the user's folder."""
    monkeypatch.setattr(cifar, "_download", lambda *a: pytest.fail("a download was attempted"))
    make, name = (make_cifar10, "cifar-10-batches-py") if dataset == "cifar10" else (make_cifar100, "cifar-100-python")
    data = make(tmp_path)
    ds = load_dataset(dataset, tmp_path / name, download=True)
    assert_split(ds.test, data.test_images, data.test_labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("missing", ["test_batch", "batches.meta", "data_batch_2"])
def test_the_extracted_folder_itself_lacking_a_file_is_named_not_downloaded_into(tmp_path, missing, monkeypatch):
    """Without test_batch or batches.meta it was not recognised: a download would have nested the
    official files inside the user's folder and trained on them."""
    monkeypatch.setattr(cifar, "_download", lambda *a: pytest.fail("a download was attempted"))
    make_cifar10(tmp_path, n_train_per_batch=2, n_test=3)
    (tmp_path / CIFAR10.folder / missing).unlink()
    with pytest.raises(CifarlensError, match=rf"CIFAR-10 folder .*cifar-10-batches-py is incomplete: {missing} is "
                                             r"missing; delete the folder and put cifar-10-python.tar.gz into"):
        load_dataset("cifar10", tmp_path / CIFAR10.folder, download=True)
    make_cifar100(tmp_path / "c100", n_train=100, n_test=20)  # its files "train" and "test", a copy's folders' names
    (tmp_path / "c100" / CIFAR100.folder / "test").unlink()
    with pytest.raises(CifarlensError, match=r"CIFAR-100 folder .*cifar-100-python is incomplete: test is missing"):
        load_dataset("cifar100", tmp_path / "c100" / CIFAR100.folder, download=True)


def test_what_sits_where_the_archive_is_extracted_is_named(tmp_path):
    """Beside a good archive: an empty folder was 'incomplete, put the archive there' (it was there),
    a file of that name made the archive's extraction fail with 'delete it' (the archive)."""
    data = make_cifar_archive(tmp_path, "cifar10", n_train_per_batch=2, n_test=3)
    folder = tmp_path / CIFAR10.folder
    folder.write_text("in the way")
    with pytest.raises(CifarlensError, match=rf"{folder} is a file where the extracted CIFAR-10 folder goes; move it"):
        load_dataset("cifar10", tmp_path, download=False)
    folder.unlink()
    folder.mkdir()  # empty: the archive is extracted into its place
    assert_split(load_dataset("cifar10", tmp_path, download=False).test, data.test_images, data.test_labels)
    (folder / "data_batch_4").unlink()
    (folder / "data_batch_4").mkdir()
    with pytest.raises(CifarlensError, match=rf"incomplete: data_batch_4 is not a file; delete the folder, and "
                                             rf"{tmp_path / 'cifar-10-python.tar.gz'} beside it is extracted again"):
        load_dataset("cifar10", tmp_path, download=False)


def test_official_files_whose_training_labels_name_one_class_are_refused(tmp_path):
    """They trained a 10-class model on one class (chance accuracy); image folders refuse one class."""
    from cifarlens.config import DataConfig
    from cifarlens.data.pipeline import prepare_data

    make_cifar10(tmp_path, n_train_per_batch=4, n_test=10)
    for name in CIFAR10.train_files:
        path = tmp_path / CIFAR10.folder / name
        batch = pickle.loads(path.read_bytes(), encoding="bytes")  # our own test file (py2 style)
        batch[b"labels"] = [3] * len(batch[b"labels"])
        path.write_bytes(pickle.dumps(batch))
    with pytest.raises(CifarlensError, match=r"the training split of .* has one class only \(cat\); a classifier "
                                             r"needs at least 2 classes"):
        prepare_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False), seed=0)


def test_official_files_with_other_counts_are_named_in_a_warning(tmp_path):
    """A subset saved under the official file names is not the official split: the run's log says so."""
    from cifarlens.data.base import count_warning

    make_cifar10(tmp_path, n_train_per_batch=8, n_test=12)
    ds = load_dataset("cifar10", tmp_path, download=False)
    train, test = ds.source.warnings
    assert "cifar-10-batches-py" in train and "data_batch_1..data_batch_5 has 40 images, the official split 50,000" in train
    assert "test_batch has 12 images, the official split 10,000" in test
    balanced = torch.arange(10).repeat(3)
    assert count_warning("test/", balanced, ds.info, per_class=3) is None
    assert "airplane 2" in count_warning("test/", balanced[1:], ds.info, per_class=3)


def test_a_cifar100_layout_with_other_class_names_is_said_to_be_another_dataset(tmp_path):
    """It was labelled CIFAR-100 in every figure and set beside the literature, silently."""
    make_cifar100(tmp_path, n_train=200, n_test=100, classes=tuple(f"thing{k}" for k in range(100)))
    ds = load_dataset("cifar100", tmp_path, download=False)
    assert ds.info.classes[99] == "thing99"
    assert any("meta names 100 class(es) the official CIFAR-100 does not have (thing0, thing1, thing2, ...): this is "
               "not CIFAR-100" in w for w in ds.source.warnings), ds.source.warnings
    assert ds.source.label(ds.info) == "another dataset in the CIFAR-100 layout"  # what the log and report call it
    official = load_dataset("cifar100", make_cifar100(tmp_path / "official", n_train=200, n_test=100).data_dir,
                            download=False)
    assert not any("does not have" in w for w in official.source.warnings)
    assert official.source.label(official.info) == "CIFAR-100"


def test_a_class_named_twice_in_the_meta_file_is_refused(tmp_path):
    names = list(cifar.CIFAR100_INFO.classes)
    names[99] = names[0]
    make_cifar100(tmp_path, n_train=200, n_test=100, classes=tuple(names))
    with pytest.raises(CifarlensError, match="the class 'apple' is named twice"):
        load_dataset("cifar100", tmp_path, download=False)


def test_official_names_in_another_order_warn_and_float_labels_are_refused(tmp_path):
    make_cifar10(tmp_path, n_train_per_batch=2, n_test=2, classes=tuple(reversed(cifar.CIFAR10_INFO.classes)))
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.info.classes[0] == "truck"  # the labels follow the file
    assert any("batches.meta lists the CIFAR-10 classes in another order" in w for w in ds.source.warnings)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    d = pickle.loads(batch.read_bytes(), encoding="latin1")
    d["labels"] = [1.7] * len(d["labels"])
    write_cifar_pickle(batch, d, "str")
    with pytest.raises(CifarlensError, match=r"'labels' is not a list of integers"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar10_fixture(cifar10_dir):
    ds = load_dataset("cifar10", cifar10_dir, download=False)
    assert len(ds.train) == 200 and len(ds.test) == 50
    assert torch.bincount(ds.train.labels).tolist() == [20] * 10


def test_cifar_pixel_lands_at_channel_row_column(tmp_path):
    make_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    rows = np.zeros((2, 3072), dtype=np.uint8)
    rows[1, 0 * 1024 + 0 * 32 + 31] = 100  # R, y=0, x=31
    rows[1, 1 * 1024 + 5 * 32 + 7] = 200  # G, y=5, x=7
    rows[1, 2 * 1024 + 31 * 32 + 0] = 50  # B, y=31, x=0
    write_cifar_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": rows, "labels": [3, 9]})
    images = load_dataset("cifar10", tmp_path, download=False).test.images
    assert (images[1, 0, 0, 31], images[1, 1, 5, 7], images[1, 2, 31, 0]) == (100, 200, 50)
    assert int(images.sum()) == 350


def test_cifar_class_names_come_from_meta(tmp_path):
    names = tuple(f"thing{k}" for k in range(10))
    make_cifar10(tmp_path, n_train_per_batch=2, n_test=2, classes=names)
    assert load_dataset("cifar10", tmp_path, download=False).info.classes == names


@pytest.mark.parametrize("style", ["py2", "bytes"])
def test_cifar100_uses_100_fine_labels(tmp_path, style):
    data = make_cifar100(tmp_path, n_train=300, n_test=100, style=style)
    ds = load_dataset("cifar100", tmp_path, download=False)
    assert ds.info.name == "cifar100" and ds.info.num_classes == 100
    assert ds.info.classes == data.classes  # from meta["fine_label_names"]
    assert ds.info.mean == (0.5071, 0.4865, 0.4409) and ds.info.std == (0.2673, 0.2564, 0.2762)
    assert_split(ds.train, data.train_images, data.train_labels)  # fine, not coarse (= fine // 5)
    assert_split(ds.test, data.test_images, data.test_labels)
    assert int(ds.train.labels.max()) == 99


def test_cifar100_fixture_and_official_names(cifar100_dir):
    ds = load_dataset("cifar100", cifar100_dir, download=False)
    assert len(ds.train) == 500 and len(ds.test) == 200
    assert len(cifar.CIFAR100_INFO.classes) == len(set(cifar.CIFAR100_INFO.classes)) == 100


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_archive_is_extracted(tmp_path, dataset):
    kwargs = {"n_train_per_batch": 4, "n_test": 6} if dataset == "cifar10" else {"n_train": 120, "n_test": 30}
    data = make_cifar_archive(tmp_path, dataset, **kwargs)
    layout = CIFAR10 if dataset == "cifar10" else CIFAR100
    assert not (tmp_path / layout.folder).exists()
    # what a SIGKILL during an earlier extraction left (50 MB for CIFAR-10), and one that may be running now
    killed, running = tmp_path / f".{layout.folder}-extract-killed0", tmp_path / f".{layout.folder}-extract-now01"
    for folder in (killed, running):
        (folder / layout.folder).mkdir(parents=True)
    os.utime(killed, (time.time() - 2 * cifar.STALE_EXTRACT_S,) * 2)
    ds = load_dataset(dataset, tmp_path, download=False)
    assert (tmp_path / layout.folder / layout.test_file).is_file()
    # the temp extraction dir removed, and the killed one's; not one that may be another process's
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [running.name]
    assert_split(ds.train, data.train_images, data.train_labels)
    assert_split(ds.test, data.test_images, data.test_labels)


def test_cifar_archive_extracts_with_the_users_umask_not_the_archives_modes(tmp_path):
    import os
    import stat

    make_cifar_archive(tmp_path, "cifar10", n_train_per_batch=4, n_test=6)  # its members are 0644
    old = os.umask(0o077)
    try:
        load_dataset("cifar10", tmp_path, download=False)
    finally:
        os.umask(old)
    folder = tmp_path / CIFAR10.folder
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}
    assert modes[CIFAR10.folder] == 0o700 and modes[CIFAR10.test_file] == 0o600, modes
    assert set(modes.values()) <= {0o700, 0o600}


def test_cifar_archive_names_match_torchvision():
    import torchvision.datasets as tvd

    for layout, tv in ((CIFAR10, tvd.CIFAR10), (CIFAR100, tvd.CIFAR100)):
        assert (layout.archive, layout.folder) == (tv.filename, tv.base_folder)
        assert getattr(tvd, layout.torchvision_class) is tv


def test_cifar_archive_path_traversal_refused(tmp_path):
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        payload = b"owned"
        member = tarfile.TarInfo("../escaped.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(CifarlensError, match="could not extract .*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_an_incomplete_cifar_archive_is_named_and_leaves_no_folder(tmp_path):
    """Its folder was put in place, and the folder's error said to extract the same archive again."""
    make_cifar10(tmp_path / "full", n_train_per_batch=2, n_test=3)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for path in sorted((tmp_path / "full" / CIFAR10.folder).iterdir()):
            if path.name != "data_batch_3":
                tar.add(path, arcname=f"{CIFAR10.folder}/{path.name}")
    with pytest.raises(CifarlensError, match=r"cifar-10-python.tar.gz is incomplete: it lacks "
                                             r"cifar-10-batches-py/data_batch_3; delete it"):
        load_dataset("cifar10", tmp_path, download=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz", "full"]


def test_cifar_corrupt_archive(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CifarlensError, match="could not extract .*cifar-100-python.tar.gz"):
        load_dataset("cifar100", tmp_path, download=False)


def test_cifar_resize(tmp_path):
    make_cifar10(tmp_path, n_train_per_batch=2, n_test=3)
    ds = load_dataset("cifar10", tmp_path, download=False, image_size=16)
    assert ds.train.images.shape == (10, 3, 16, 16) and ds.test.images.dtype == torch.uint8
    assert ds.info.image_size == 16
    flat = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    assert (base.resize_uint8(flat, 16) == 77).all()


def test_cifar_missing_everything(tmp_path):
    with pytest.raises(CifarlensError, match=r"CIFAR-10 not found: put cifar-10-python.tar.gz .*https://www.cs.toronto.edu"):
        load_dataset("cifar10", tmp_path, download=False)
    with pytest.raises(CifarlensError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path / "nope", download=False)


def test_cifar_missing_batch_file(cifar10_dir):
    (cifar10_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(CifarlensError, match="data_batch_3 is missing"):
        load_dataset("cifar10", cifar10_dir, download=False)


def test_cifar_truncated_batch_file(cifar10_dir):
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CifarlensError, match=r"corrupt CIFAR-10 file .*data_batch_2"):
        load_dataset("cifar10", cifar10_dir, download=False)


def test_cifar_garbage_meta(cifar10_dir):
    (cifar10_dir / "cifar-10-batches-py" / "batches.meta").write_bytes(os.urandom(300))
    with pytest.raises(CifarlensError, match=r"batches.meta"):
        load_dataset("cifar10", cifar10_dir, download=False)


@pytest.mark.parametrize(
    "batch, problem",
    [
        ({"data": np.zeros((4, 3000), np.uint8), "labels": [0] * 4}, r"\(N, 3072\) uint8"),
        ({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}, r"\(N, 3072\) uint8"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}, "4 images"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}, r"in \[0, 9\]"),
        ({"data": np.zeros((4, 3072), np.uint8)}, "no 'labels' entry"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_cifar_invalid_batch_contents(cifar10_dir, batch, problem):
    path = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(CifarlensError, match=rf"corrupt CIFAR-10 file .*test_batch: .*{problem}"):
        load_dataset("cifar10", cifar10_dir, download=False)


class _Exploit:
    """Unpickling this calls ``func(arg)``."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("func", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused(cifar10_dir, tmp_path, func):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"data": _Exploit(func, arg), "labels": []}, f, protocol=2)
    with pytest.raises(CifarlensError, match=r"refusing to load .*data_batch_1.*possibly malicious"):
        load_dataset("cifar10", cifar10_dir, download=False)
    assert not marker.exists()


def test_unpickler_allows_numpy_arrays_only():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    # protocol 5 (pickle.HIGHEST_PROTOCOL, a subset re-saved) stores arrays with numpy's _frombuffer,
    # and protocol 2 an empty one with bytes()
    for protocol in (2, 3, 4, 5):
        for data in (array, array[:0]):
            blob = pickle.dumps({b"data": data, "x": np.float64(1.5)}, protocol=protocol)
            loaded = NumpyOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()
            assert loaded[b"data"].shape == data.shape and loaded[b"data"].dtype == np.uint8
            np.testing.assert_array_equal(loaded[b"data"], data)
            assert loaded["x"] == 1.5
    with pytest.raises(pickle.UnpicklingError, match="builtins.object"):  # what they hold is checked as ever
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(np.array([object()], dtype=object), protocol=5))).load()
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(__import__("collections").OrderedDict(), protocol=2))).load()


# ---------------------------------------------------------------------------
# Downloads (this machine is offline; the network is also faked so the tests never download)
# ---------------------------------------------------------------------------


def _fake_offline(monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_cifar_download_offline_fails_fast(tmp_path, monkeypatch):
    _fake_offline(monkeypatch)
    data_dir = tmp_path / "new" / "dir"
    start = time.monotonic()
    with pytest.raises(CifarlensError, match=r"could not download CIFAR-10 \(.*\); put cifar-10-python.tar.gz") as e:
        load_dataset("cifar10", data_dir, download=True)
    assert time.monotonic() - start < 5
    assert "\n" not in str(e.value) and "https://www.cs.toronto.edu/~kriz/cifar.html" in str(e.value)
    assert not (tmp_path / "new").exists()  # the folders made for it are gone again, and no partial file


def test_download_stops_waiting_for_a_hanging_connection(tmp_path, monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(base, "CONNECT_TIMEOUT_S", 0.3)
    start = time.monotonic()
    with pytest.raises(CifarlensError, match=r"could not download CIFAR-100 \(no connection to www.cs.toronto.edu:443"):
        load_dataset("cifar100", tmp_path, download=True)
    assert time.monotonic() - start < 2


def test_fashion_download_offline_fails_fast(tmp_path, monkeypatch):
    _fake_offline(monkeypatch)
    start = time.monotonic()
    with pytest.raises(CifarlensError, match="could not download Fashion-MNIST") as e:
        load_dataset("fashion-mnist", tmp_path, download=True)
    assert time.monotonic() - start < 5
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "--data-dir /usr/share/datasets/fashion-mnist" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # FashionMNIST/raw/ was left behind, empty


def _host_resolves(host: str) -> bool:
    try:
        base._check_reachable(f"https://{host}/", timeout=3)
        return True
    except OSError:
        return False


def test_real_offline_download_fails_within_30s(tmp_path):
    """The real network path, without fakes; skipped where a download could actually start."""
    if _host_resolves("www.cs.toronto.edu"):
        pytest.skip("online: a real download of CIFAR-10 (170 MB) would start")
    start = time.monotonic()
    with pytest.raises(CifarlensError, match="could not download CIFAR-10"):
        load_dataset("cifar10", tmp_path, download=True)
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gz, layout", [(True, "flat"), (False, "flat"), (True, "torchvision"), (False, "torchvision"), (True, "fashion-mnist")]
)
def test_fashion_mnist_layouts(tmp_path, gz, layout):
    data = make_fashion_mnist(tmp_path, n_train=30, n_test=20, gz=gz, layout=layout)
    ds = load_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.train.images.shape == (30, 1, 28, 28) and ds.test.images.shape == (20, 1, 28, 28)
    assert_split(ds.train, data.train_images, data.train_labels)
    assert_split(ds.test, data.test_images, data.test_labels)
    assert ds.info.classes == FASHION_CLASSES and ds.info.in_channels == 1 and ds.info.image_size == 28
    if layout == "torchvision":  # torchvision's FashionMNIST/ itself as the data folder
        assert len(load_dataset("fashion-mnist", tmp_path / "FashionMNIST", download=False).test) == 20


def test_fashion_fixture_and_pixel_position(fashion_dir):
    ds = load_dataset("fashion-mnist", fashion_dir, download=False)
    assert len(ds.train) == 200 and len(ds.test) == 50
    images = np.zeros((2, 28, 28), np.uint8)
    images[1, 3, 25] = 250  # y=3, x=25
    write_idx(fashion_dir / "t10k-images-idx3-ubyte", images, gz=True)
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte", np.array([0, 9]), gz=True)
    test = load_dataset("fashion-mnist", fashion_dir, download=False).test
    assert test.images[1, 0, 3, 25] == 250 and int(test.images.sum()) == 250
    assert test.labels.tolist() == [0, 9]


def test_fashion_resize(fashion_dir):
    ds = load_dataset("fashion-mnist", fashion_dir, download=False, image_size=32)
    assert ds.train.images.shape == (200, 1, 32, 32) and ds.info.image_size == 32


def test_fashion_missing_file(fashion_dir, monkeypatch):
    (fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(CifarlensError, match=r"t10k-labels-idx1-ubyte\[.gz\] missing .*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", fashion_dir, download=False)
    # with downloads allowed, the user's files are not joined by the official ones (a run trained on those)
    import cifarlens.data.fashion_mnist as fashion

    monkeypatch.setattr(fashion, "download_file", lambda *a, **k: pytest.fail("must not download beside them"))
    with pytest.raises(CifarlensError, match=r"is incomplete: t10k-labels-idx1-ubyte\[.gz\] missing; add it"):
        load_dataset("fashion-mnist", fashion_dir, download=True)
    assert not (fashion_dir / "FashionMNIST").exists()


def test_a_fashion_subset_under_the_official_names_is_said_so(fashion_dir):
    ds = load_dataset("fashion-mnist", fashion_dir, download=False)
    assert len(ds.source.warnings) == 2
    assert "train-images-idx3-ubyte.gz has 200 images, the official split 60,000" in ds.source.warnings[0]
    assert "t10k-images-idx3-ubyte.gz has 50 images, the official split 10,000" in ds.source.warnings[1]


def test_fashion_bad_magic(fashion_dir):
    write_idx(fashion_dir / "train-labels-idx1-ubyte", np.zeros((200, 2, 2), np.uint8), gz=True)  # magic 0x803
    with pytest.raises(CifarlensError, match=r"train-labels-idx1-ubyte.gz: magic number 0x00000803, expected 0x00000801"):
        load_dataset("fashion-mnist", fashion_dir, download=False)


def test_fashion_truncated_files(tmp_path):
    make_fashion_mnist(tmp_path, n_train=20, n_test=10, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CifarlensError, match=r"corrupt IDX file .*train-images-idx3-ubyte: .*truncated"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_fashion_truncated_gz(fashion_dir):
    path = fashion_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CifarlensError, match=r"corrupt IDX file .*t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", fashion_dir, download=False)


def test_fashion_label_count_and_range(fashion_dir):
    write_idx(fashion_dir / "train-labels-idx1-ubyte", np.zeros(199, np.uint8), gz=True)
    with pytest.raises(CifarlensError, match="199 labels for the 200 images"):
        load_dataset("fashion-mnist", fashion_dir, download=False)
    write_idx(fashion_dir / "train-labels-idx1-ubyte", np.full(200, 10, np.uint8), gz=True)
    with pytest.raises(CifarlensError, match=r"label 10 is not in \[0, 9\]"):
        load_dataset("fashion-mnist", fashion_dir, download=False)


@pytest.mark.slow
def test_real_fashion_mnist_and_its_statistics():
    if not (FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no Fashion-MNIST in {FASHION_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist", FASHION_SYSTEM_DIR, download=False)
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10
    mean, std = channel_stats(ds.train.images)
    assert mean == pytest.approx(fashion_mnist.INFO.mean, abs=1e-3)
    assert std == pytest.approx(fashion_mnist.INFO.std, abs=1e-3)


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------


def test_imagefolder_fixture_mixed_formats(imagefolder_dir):
    ds = load_dataset("imagefolder", imagefolder_dir)
    assert ds.train.images.shape == (200, 3, 32, 32) and ds.test.images.shape == (50, 3, 32, 32)
    assert ds.train.images.dtype == torch.uint8 and ds.val is None
    assert ds.info.name == "imagefolder" and ds.info.hflip and ds.info.in_channels == 3 and ds.info.image_size == 32
    assert ds.info.classes == tuple(f"class_{k}" for k in range(10))
    assert torch.bincount(ds.train.labels).tolist() == [20] * 10
    assert (ds.info.mean, ds.info.std) == channel_stats(ds.train.images)


def test_imagefolder_labels_follow_sorted_classes(tmp_path):
    data = make_imagefolder(tmp_path, classes=("zebra", "ant", "moth"), n_per_class=3, n_test_per_class=2)
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.info.classes == ("ant", "moth", "zebra")
    np.testing.assert_array_equal(ds.train.labels.numpy(), data.train_labels)
    np.testing.assert_array_equal(ds.test.labels.numpy(), data.test_labels)


def test_imagefolder_names_each_image_and_a_subset_keeps_the_names(tmp_path):
    make_imagefolder(tmp_path, classes=("zebra", "ant"), n_per_class=3, n_test_per_class=2, n_val_per_class=1)
    ds = load_dataset("imagefolder", tmp_path)
    for split, folder in ((ds.train, "train"), (ds.test, "test"), (ds.val, "val")):
        assert len(split.files) == len(split)
        assert [f.split("/")[:2] for f in split.files] == [[folder, ds.info.classes[y]] for y in split.labels.tolist()]
        assert all((tmp_path / f).is_file() for f in split.files)
    picked = ds.train.subset(torch.tensor([4, 0]))
    assert picked.files == (ds.train.files[4], ds.train.files[0]) and picked.labels.tolist() == [1, 0]
    assert load_dataset("fashion-mnist", make_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10).data_dir,
                        download=False).test.files is None  # the official files: an image's place is its name


def _one_image_per_class(root: Path, images: dict[str, tuple[np.ndarray, str]]) -> None:
    """root/{train,test}/<class>/img.<fmt> for each class -> (rgb array, format)."""
    for split in ("train", "test"):
        for name, (rgb, fmt) in images.items():
            save_image(root / split / name / "img", rgb, fmt)


def test_imagefolder_exact_pixel_position(tmp_path):
    a = np.zeros((32, 32, 3), np.uint8)
    a[3, 4] = (10, 20, 30)  # y=3, x=4
    _one_image_per_class(tmp_path, {"a": (a, "png"), "b": (a, "bmp")})
    images = load_dataset("imagefolder", tmp_path).train.images
    for i in range(2):
        assert images[i, :, 3, 4].tolist() == [10, 20, 30]
        assert int(images[i].sum()) == 60


def test_imagefolder_modes_are_converted_to_rgb(tmp_path):
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[:, :16] = (200, 40, 90)
    colour[:, 16:] = (10, 250, 0)
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # values 0..248 along x
    _one_image_per_class(
        tmp_path,
        {
            "rgba": (colour, "png-rgba"),  # alpha dropped, colours kept
            "gif": (colour, "gif"),  # palette image
            "jpeg": (colour, "jpeg"),
            "webp": (colour, "webp"),
            "tiff": (colour, "tiff"),
        },
    )
    for name, values in {"l": gray, "i16": gray}.items():
        for split in ("train", "test"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            if name == "l":
                Image.fromarray(values).save(folder / "img.png")
            else:  # 16-bit PNG: 8-bit v stored as v * 257 (65535 for 255)
                Image.fromarray(values.astype(np.uint16) * 257).save(folder / "img.png")
    ds = load_dataset("imagefolder", tmp_path)
    images = {name: ds.train.images[i].permute(1, 2, 0).numpy() for i, name in enumerate(ds.info.classes)}  # (H, W, 3)
    for name in ("rgba", "gif", "webp", "tiff"):
        np.testing.assert_array_equal(images[name], colour, err_msg=name)
    away_from_edge = np.r_[0:12, 20:32]  # JPEG chroma subsampling blurs the colour edge at x = 16
    assert np.abs(images["jpeg"].astype(int) - colour)[:, away_from_edge].max() <= 6
    for name in ("l", "i16"):
        np.testing.assert_array_equal(images[name], np.repeat(gray[..., None], 3, axis=2), err_msg=name)


def test_imagefolder_16bit_extremes(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)  # -> 0, 1, 128, 255
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(values).save(tmp_path / split / name / "x.png")
    img = load_dataset("imagefolder", tmp_path, image_size=4).train.images[0]
    assert Image.open(tmp_path / "train" / "a" / "x.png").mode.startswith("I")
    assert img[:, 0].tolist() == [[0, 1, 128, 255]] * 3


def test_32bit_integer_images_with_8bit_values_are_not_darkened(tmp_path):
    """A TIFF of int32 0..255 values (8-bit grey saved wider) read as 16-bit came out black."""
    from cifarlens.images import load_image

    values = np.array([[0, 1, 128, 255]], dtype=np.int32).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "eight.tiff")
    Image.fromarray(values * 257).save(tmp_path / "sixteen.tiff")  # 16-bit values in 32-bit integers
    for name in ("eight.tiff", "sixteen.tiff"):
        assert Image.open(tmp_path / name).mode == "I"
        assert load_image(tmp_path / name, 1, 4)[0, 0].tolist() == [0, 1, 128, 255], name


def test_imagefolder_resize_and_val(tmp_path):
    data = make_imagefolder(
        tmp_path, classes=("a", "b"), n_per_class=4, n_test_per_class=2, n_val_per_class=3, sizes=((64, 48), (20, 30))
    )
    ds = load_dataset("imagefolder", tmp_path, image_size=16)
    assert ds.train.images.shape == (8, 3, 16, 16) and ds.info.image_size == 16
    assert ds.val is not None and ds.val.images.shape == (6, 3, 16, 16)
    np.testing.assert_array_equal(ds.val.labels.numpy(), data.val_labels)
    flat = np.full((48, 64, 3), (5, 100, 220), np.uint8)
    save_image(tmp_path / "train" / "a" / "zzz", flat, "png")
    resized = load_dataset("imagefolder", tmp_path, image_size=16).train.images[4]  # last file of class a
    assert resized.permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() == [[5, 100, 220]]


def test_imagefolder_all_formats_known():
    from torchvision.datasets.folder import IMG_EXTENSIONS as TV_EXTENSIONS

    from cifarlens.images import IMAGE_EXTENSIONS, format_names

    assert set(TV_EXTENSIONS) | {".gif"} <= IMAGE_EXTENSIONS
    assert len(IMAGE_FORMATS) >= 9
    # what a run records: one name a format, whatever the spelling (TIF and TIFF were two)
    assert format_names({".tif", ".TIFF", ".jpg", ".JPEG", ".jfif", ".png"}) == ("JPEG", "PNG", "TIFF")


def test_imagefolder_follows_linked_subfolders_once_and_survives_a_loop(tmp_path):
    """A class folder may hold links to folders of images (torchvision's ImageFolder follows them;
    Path.rglob did not, and their images were left out without a word); a link back up is no loop."""
    make_imagefolder(tmp_path / "data", classes=("a", "b"), n_per_class=2, n_test_per_class=1, junk=False)
    elsewhere = tmp_path / "more_a"
    for i in range(3):
        save_image(elsewhere / f"extra{i}", np.full((8, 8, 3), 40 * i, np.uint8), "png")
    (tmp_path / "data" / "train" / "a" / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "again").symlink_to(elsewhere, target_is_directory=True)  # a loop
    train = load_dataset("imagefolder", tmp_path / "data", image_size=8).train
    assert train.labels.tolist() == [0] * 5 + [1] * 2  # 2 + 3 linked images of a, and b's 2 once
    assert train.images[2:5, 0, 0, 0].tolist() == [0, 40, 80]  # the linked ones, by name


def test_imagefolder_reads_every_jpeg_name_and_counts_what_it_skips(tmp_path):
    """.jfif and .jpe are JPEG files as browsers save them; other files are counted in a warning,
    and a val/ under another name is named, since it is not read."""
    make_imagefolder(tmp_path, classes=("a", "b"), n_per_class=2, n_test_per_class=1, formats=("png",), junk=False)
    pixels = np.full((8, 8, 3), 200, np.uint8)
    Image.fromarray(pixels).save(tmp_path / "train" / "a" / "web.jfif", format="JPEG")
    Image.fromarray(pixels).save(tmp_path / "train" / "b" / "old.jpe", format="JPEG")
    (tmp_path / "train" / "a" / "labels.txt").write_text("a")
    (tmp_path / "train" / "a" / "README").write_text("no extension")
    (tmp_path / "train" / "loose.png").write_bytes((tmp_path / "train" / "a" / "web.jfif").read_bytes())
    (tmp_path / "valid" / "a").mkdir(parents=True)
    ds = load_dataset("imagefolder", tmp_path, image_size=8)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.source.formats == ("JPEG", "PNG") and ds.source.lossy
    skipped, other = ds.source.warnings
    assert "3 file(s) under" in skipped and ".txt 1" in skipped and "no extension 1" in skipped
    assert "1 beside the class folders, in no class" in skipped and ".png" not in skipped.split("read:")[0]  # an image
    assert "valid/" in other and "rename it val/" in other
    (tmp_path / "train" / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a link whose file is gone
    skipped = load_dataset("imagefolder", tmp_path, image_size=8).source.warnings[0]
    assert "4 file(s) under" in skipped and f"1 link(s) to files that do not exist, e.g. {tmp_path}" in skipped
    assert "2 beside" not in skipped  # not counted as an image beside the class folders


def test_imagefolder_refuses_a_link_to_a_folder_above_the_class(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), n_per_class=2, n_test_per_class=1, junk=False)
    (tmp_path / "train" / "a" / "up").symlink_to(tmp_path / "train", target_is_directory=True)
    with pytest.raises(CifarlensError, match=r"a folder above .*train/a: the images there would be counted again"):
        load_dataset("imagefolder", tmp_path)


@pytest.mark.parametrize("link, target", [("train/a/bs", "train/b"),  # another class: two labels
                                          ("test/a/train_a", "train/a"),  # another split: trained and tested on
                                          ("train/a/same.png", "train/b/0.png")])  # one image file linked
def test_one_image_file_reached_twice_through_a_link_is_refused(tmp_path, link, target):
    """A link from one class folder to its sibling gave the sibling's images both labels, without a word."""
    make_imagefolder(tmp_path, classes=("a", "b"), n_per_class=2, n_test_per_class=1, formats=("png",), junk=False)
    if target.endswith(".png"):
        target = str(next((tmp_path / "train" / "b").iterdir()).relative_to(tmp_path))
    (tmp_path / link).symlink_to(tmp_path / target, target_is_directory=(tmp_path / target).is_dir())
    with pytest.raises(CifarlensError, match=re.escape(f"in {tmp_path} are one file, reached through a link: its "
                                                       "image would count twice (under two labels, or in two splits); "
                                                       "remove the link")):
        load_dataset("imagefolder", tmp_path, image_size=8)


def test_imagefolder_names_a_folder_it_cannot_read(tmp_path, monkeypatch):
    """(Tests run as root, whom chmod 000 does not stop: the refusal is the operating system's
    PermissionError, raised where os.walk lists the folder.)"""
    make_imagefolder(tmp_path, classes=("a", "b"), n_per_class=2, n_test_per_class=1, junk=False)
    locked = tmp_path / "train" / "a" / "locked"
    locked.mkdir()
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(CifarlensError, match=rf"cannot read the folder {locked} \(Permission denied\)"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_class_names_in_either_unicode_form_and_not_text(tmp_path):
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    make_imagefolder(tmp_path / "ok", classes=(nfc, "b"), n_per_class=2, n_test_per_class=1, junk=False)
    (tmp_path / "ok" / "test" / nfc).rename(tmp_path / "ok" / "test" / nfd)  # as copied from a Mac
    ds = load_dataset("imagefolder", tmp_path / "ok")
    assert ds.info.classes == ("b", nfc) and sorted(ds.test.labels.tolist()) == [0, 1]
    # the classes' order is their names' (NFC), not their bytes': "caff" before "café" in either form (NFD's
    # "cafe" + accent sorted first, so a copy from a Mac numbered them the other way round)
    make_imagefolder(tmp_path / "mac", classes=(nfd, "caff"), n_per_class=2, n_test_per_class=1, junk=False)
    assert load_dataset("imagefolder", tmp_path / "mac").info.classes == ("caff", nfc)
    bad = tmp_path / "bad"
    make_imagefolder(bad, classes=("a", "b"), n_per_class=2, n_test_per_class=1, junk=False)
    os.rename(bytes(bad / "train" / "a"), bytes(bad / "train") + b"/caf\xe9")  # Latin-1 bytes, not UTF-8
    with pytest.raises(CifarlensError, match=r"class folder name 'caf\\udce9' .* is not valid UTF-8"):
        load_dataset("imagefolder", bad)


def test_imagefolder_class_mismatch(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), n_per_class=2, n_test_per_class=1, junk=False)
    save_image(tmp_path / "test" / "c" / "x", np.zeros((8, 8, 3), np.uint8), "png")
    with pytest.raises(CifarlensError, match=r"test has classes that train/ lacks: 'c'"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_empty_class(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), n_per_class=2, n_test_per_class=1)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(CifarlensError, match=r"class folder .*empty has no images"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_missing_folders(tmp_path):
    with pytest.raises(CifarlensError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "nope")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(CifarlensError, match="no test/ folder"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_unreadable_image(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"), n_per_class=2, n_test_per_class=1, formats=("png",))
    (tmp_path / "test" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(CifarlensError, match=r"cannot read image .*broken.jpg"):
        load_dataset("imagefolder", tmp_path)
    png = tmp_path / "test" / "b" / "broken.jpg"
    png.unlink()
    good = tmp_path / "train" / "a" / "000.png"
    good.write_bytes(good.read_bytes()[:60])  # truncated PNG
    with pytest.raises(CifarlensError, match=r"cannot read image .*000.png"):
        load_dataset("imagefolder", tmp_path)


@pytest.mark.parametrize("max_pixels", [600, 100], ids=["warning-range", "error-range"])
def test_imagefolder_decompression_bomb(tmp_path, monkeypatch, max_pixels):
    make_imagefolder(tmp_path, classes=("a", "b"), n_per_class=1, n_test_per_class=1, formats=("png",), sizes=((32, 32),))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", max_pixels)  # 32*32 = 1024 pixels
    with pytest.raises(CifarlensError, match=r"refusing to decode .*\.png"):
        load_dataset("imagefolder", tmp_path)


def test_formats_an_upload_could_abuse_are_not_decoded(tmp_path, monkeypatch):
    """An EPS upload ran Ghostscript on the server (Pillow renders EPS with it); an ICO holding a
    13000 x 13000 PNG decoded it inside Image.open, before the pixel guard. Neither is opened now."""
    import io

    from cifarlens.images import load_image
    from conftest import fake_ghostscript

    marker = fake_ghostscript(tmp_path, monkeypatch)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n"
    with pytest.raises(CifarlensError, match=r"cannot read image upload: it is a PostScript/EPS file, not an image in "
                                             r"a format cifarlens reads \(AVIF, BMP, GIF, JPEG, PNG, PPM, TGA, TIFF, "
                                             r"WEBP\); convert it to PNG or JPEG first"):
        load_image(eps, 3, 32)
    assert not marker.exists()  # no interpreter ran
    ico = io.BytesIO()
    Image.new("RGB", (32, 32)).save(ico, format="ICO")
    with pytest.raises(CifarlensError, match="it is an ICO icon file, not an image in a format cifarlens reads"):
        load_image(ico, 3, 32)  # a file object, as the server's and users' code pass
    path = tmp_path / "favicon.png"
    path.write_bytes(ico.getvalue())
    with pytest.raises(CifarlensError, match=r"favicon\.png: it is an ICO icon file"):
        load_image(path, 3, 32)
    png = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(png, format="PNG")
    assert load_image(png.getvalue(), 3, 32)[0].float().mean() == 255  # what it reads, it still reads


@pytest.mark.parametrize("head, named", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "a HEIC/HEIF file"),  # an iPhone photo
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "an XML (SVG?) file"),
    (b"\n<svg width='32' height='32'></svg>", "an SVG file"),
    (b"%PDF-1.7\n", "a PDF file"),
    (b"just some text, not an image", None),
])
def test_an_unread_format_is_named_when_it_is_known(head, named):
    """Files of a format cifarlens does not read say what they are (a user with a .heic photo
    learns to convert it); anything else keeps the list of what is read."""
    from cifarlens.images import load_image

    with pytest.raises(CifarlensError) as err:
        load_image(head, 3, 32)
    message = str(err.value)
    assert "not an image in a format cifarlens reads (AVIF, BMP" in message
    if named:
        assert f"cannot read image upload: it is {named}, not an image" in message and "convert it to PNG" in message
    else:
        assert "it is" not in message and "convert" not in message


# ---------------------------------------------------------------------------
# channel_stats
# ---------------------------------------------------------------------------


def test_channel_stats_hand_computed():
    images = torch.zeros((2, 2, 1, 2), dtype=torch.uint8)  # (N=2, C=2, H=1, W=2)
    images[:, 0] = torch.tensor([[[0, 255]], [[255, 255]]], dtype=torch.uint8)  # channel 0: 0, 255, 255, 255
    images[:, 1] = 51  # channel 1: constant 0.2
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.75, 0.2), abs=1e-12)
    # population std of {0,1,1,1}; a constant channel's std is reported as 1.0 (normalising only centres it)
    assert std == pytest.approx((np.sqrt(0.75 * 0.25), 1.0), abs=1e-12)


def test_channel_stats_flat_channel_is_not_blown_up():
    # one pixel in 10,000 differs by one grey level: std ~0.0004, under FLAT_STD -> 1.0; two grey
    # levels spread evenly (std 1/255) is kept
    images = torch.full((100, 2, 10, 10), 100, dtype=torch.uint8)
    images[0, 0, 0, 0] = 101
    images[::2, 1] += 2
    mean, std = channel_stats(images)
    assert std == pytest.approx((1.0, 1 / 255), abs=1e-12)
    assert mean[0] == pytest.approx((100 * 9999 + 101) / 10000 / 255, abs=1e-12)


def test_channel_stats_matches_float64_for_any_chunk():
    images = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = images.double().div(255).transpose(0, 1).reshape(3, -1)
    for chunk in (1, 8, 1000):
        mean, std = channel_stats(images, chunk=chunk)
        assert mean == pytest.approx(tuple(x.mean(1).tolist()), abs=1e-12)
        assert std == pytest.approx(tuple(x.std(1, correction=0).tolist()), abs=1e-12)
    with pytest.raises(ValueError):
        channel_stats(images.float())


def test_images_too_large_for_memory_are_a_clear_error(tmp_path, monkeypatch):
    """--set data.image_size=20000 on an image folder ended in torch's allocator error, a traceback."""
    import torch

    from cifarlens.data.base import DATASETS

    def reader(data_dir, *, download, image_size):  # what holding every image at that size asks for
        torch.empty(2**52, dtype=torch.uint8)

    monkeypatch.setitem(DATASETS._items, "imagefolder", reader)
    with pytest.raises(CifarlensError, match="not enough memory to hold the imagefolder images at 4000x4000: choose "
                                             "a smaller data.image_size"):
        load_dataset("imagefolder", tmp_path, download=False, image_size=4000)


def test_a_lab_image_is_read_by_a_greyscale_model_too():
    """ValueError: conversion from LAB to L not supported, for a LAB TIFF on a 1-channel (Fashion-MNIST) run."""
    import io

    from cifarlens.images import load_image

    lab = Image.new("RGB", (8, 8), (200, 30, 30)).convert("LAB")
    buffer = io.BytesIO()
    lab.save(buffer, format="TIFF")
    grey = load_image(buffer.getvalue(), 1, 8)
    expected = np.asarray(Image.new("RGB", (8, 8), (200, 30, 30)).convert("L"))
    assert grey.shape == (1, 8, 8) and abs(int(grey[0, 0, 0]) - int(expected[0, 0])) <= 3


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "cifar100", "imagefolder"])
def test_a_data_dir_below_a_file_or_a_data_file_itself_is_a_one_line_error(tmp_path, name):
    """--data-dir FILE/sub (downloading on) and Fashion-MNIST's --data-dir IDX_FILE said only
    "Not a directory: ..." (the Python API raised NotADirectoryError)."""
    file = tmp_path / "train-images-idx3-ubyte.gz"
    file.write_bytes(b"\x1f\x8b")
    with pytest.raises(CifarlensError, match=rf"data dir {file / 'sub'}: {file} is a file, not a folder"):
        load_dataset(name, file / "sub")
    if name == "fashion-mnist":
        with pytest.raises(CifarlensError, match=rf"data dir {file} is a file; pass the folder that holds the four"):
            load_dataset(name, file)


def test_an_empty_image_is_refused_and_in_memory_images_are_named_plainly():
    """A 0x0 image was resized to a blank one and got a prediction; a PIL image that could not be
    converted was named by its repr (a memory address) and asked "is it an image file?"."""
    from cifarlens.images import load_image

    for empty, name in ((Image.new("RGB", (0, 0)), "(a PIL image, mode RGB, 0x0)"),
                        (np.zeros((0, 5), np.uint8), "(a numpy array, uint8 (0, 5))")):
        with pytest.raises(CifarlensError, match=re.escape(f"cannot read image {name}: it is ") + r"\d+x\d+ pixels, an "
                                                 "empty image"):
            load_image(empty, 3, 32)
    with pytest.raises(CifarlensError, match=r"cannot read image \(a PIL image, mode La, 40x20\) \(ValueError") as err:
        load_image(Image.new("La", (40, 20)), 1, 32)
    assert "0x" not in str(err.value).split("40x20")[1] and "is it an image file" not in str(err.value)
