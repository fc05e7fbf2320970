"""Run files are written atomically and get the permissions ``open()`` would give them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from cifarlens.api import train
from cifarlens.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from cifarlens.config import RunConfig, merge
from cifarlens.io import atomic_write, atomic_write_json
from conftest import make_cifar10


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(umask, tmp_path, mask):
    umask(mask)
    with open(tmp_path / "plain", "w"):  # what a plain open() gives, the reference
        pass
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    save_checkpoint(tmp_path / "ckpt" / "last.pt", {"model": {"w": torch.ones(2)}})
    save_weights({"w": torch.ones(2)}, tmp_path / "model.safetensors", {"epoch": 1})
    assert mode(tmp_path / "plain") == 0o666 & ~mask
    for name in ("a.json", "ckpt/last.pt", "model.safetensors"):
        assert mode(tmp_path / name) == 0o666 & ~mask, name
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["model"]["w"].sum() == 2  # still whole and readable
    assert load_weights(tmp_path / "model.safetensors")["w"].sum() == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_rewritten_file_keeps_its_mode(umask, tmp_path):
    """A metrics.json a user made private (chmod 600) became 644 when evaluate wrote it again."""
    umask(0o022)
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})
    assert mode(target) == 0o644
    target.chmod(0o600)
    atomic_write_json(target, {"a": 2})
    save_checkpoint(tmp_path / "last.pt", {"model": {}})
    (tmp_path / "last.pt").chmod(0o640)
    save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(1)}})
    assert (mode(target), mode(tmp_path / "last.pt")) == (0o600, 0o640) and '"a": 2' in target.read_text()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/small (root only; skipped where mounting is not allowed)."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small file system")
    try:
        yield small
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_a_full_disk_or_a_read_only_one_is_named_so_with_the_target_not_a_temp_file(small_disk):
    """torch's zip writer says only "unexpected pos" on a full disk; the free space was measured after the
    partial file was removed, so a checkpoint larger than what was left was not called a full disk."""
    import errno
    import subprocess

    atomic_write(small_disk / "filler", lambda tmp: tmp.write_bytes(b"x" * 2_600_000))  # 1.5 MiB left
    target = small_disk / "checkpoints" / "last.pt"
    with pytest.raises(OSError) as caught:
        save_checkpoint(target, {"model": {"w": torch.ones(500_000)}})  # 2 MB: more than is left
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert list(target.parent.iterdir()) == []  # no partial file left
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(OSError) as caught:
        atomic_write_json(small_disk / "metrics.json", {})
    assert caught.value.errno == errno.EROFS and caught.value.filename == str(small_disk / "metrics.json")


def test_an_overwrite_is_atomic_and_a_failed_write_leaves_the_old_file(umask, tmp_path):
    umask(0o022)
    target = tmp_path / "f.txt"
    atomic_write(target, lambda tmp: tmp.write_text("old"))

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_training_run_writes_files_the_group_can_read(umask, tmp_path):
    """A real (tiny) training run under umask 027: its files are rw-r-----, not private by accident."""
    umask(0o027)
    data = make_cifar10(tmp_path / "data", n_train_per_batch=20, n_test=20)
    cfg = merge(RunConfig(), {
        "data": {"dataset": "cifar10", "data_dir": str(data.data_dir), "download": False},
        "model": {"name": "lensnet_light", "kwargs": {"widths": [4], "depths": [1]}},
        "train": {"batch_size": 32, "epochs": 1},
    })
    run = tmp_path / "run"
    train(cfg, run, report=True)
    written = ["config.yaml", "run.json", "environment.json", "history.csv", "checkpoints/last.pt",
               "model.safetensors", "metrics.json", "predictions.csv", "classification_report.txt", "report.html",
               "curves.png", "confusion_matrix.png"]
    assert {name: oct(mode(run / name)) for name in written} == {name: oct(0o640) for name in written}
    every_file = [p for p in run.rglob("*") if p.is_file()]  # nothing the list above forgot is private
    assert every_file and {oct(mode(p)) for p in every_file} == {oct(0o640)}


def test_a_file_the_user_names_keeps_what_it_is(tmp_path):
    """predict --csv /dev/null (as root) replaced the device with a plain file; a link was replaced
    by a file and what it pointed to left as it was."""
    import threading

    from cifarlens.io import write_output_text

    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    write_output_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"

    fifo = tmp_path / "pipe"  # not a regular file, as /dev/null or /dev/stdout: written into, not replaced
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_output_text(fifo, "through the pipe")
    reader.join(timeout=10)
    assert got == ["through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "pipe", "real.csv"]  # no temporary file left


def test_weights_checksum_covers_every_dtype_and_files_without_one_still_load(tmp_path):
    from safetensors.torch import save_file

    from cifarlens.checkpoint import tensors_digest
    from cifarlens.errors import CifarlensError

    tensors = {"w": torch.randn(3, 4), "steps": torch.tensor(7), "half": torch.randn(5).bfloat16(),
               "mask": torch.tensor([True, False]), "empty": torch.zeros(0)}
    save_weights(tensors, tmp_path / "ours.safetensors")
    loaded = load_weights(tmp_path / "ours.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    changed = dict(tensors, steps=torch.tensor(8))
    assert tensors_digest(changed) != tensors_digest(tensors)
    assert tensors_digest({"a": torch.zeros(2, 3)}) != tensors_digest({"a": torch.zeros(3, 2)})  # shapes count too
    save_file(changed, str(tmp_path / "foreign.safetensors"))  # another tool's file: no checksum, loads as it is
    assert torch.equal(load_weights(tmp_path / "foreign.safetensors")["steps"], torch.tensor(8))
    data = bytearray((tmp_path / "ours.safetensors").read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    (tmp_path / "ours.safetensors").write_bytes(data)
    with pytest.raises(CifarlensError, match="is damaged"):
        load_weights(tmp_path / "ours.safetensors")


def test_a_file_name_of_up_to_255_bytes_is_written(tmp_path):
    """The temporary beside it added 18 characters: a valid name of 238-255 failed "File name too long"."""
    from cifarlens.io import atomic_write_text

    for name in ("c" * 251 + ".csv", "é" * 120 + ".csv"):  # 255 bytes, and 244 in two-byte characters
        atomic_write_text(tmp_path / name, "ok")
        assert (tmp_path / name).read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
