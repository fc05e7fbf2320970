"""Data-parallel training with torchrun on CPU (gloo, 2 processes), against one process.

These start real torchrun launches (``cifarlens train --nproc 2``) in subprocesses, as a
user does; each takes a few seconds on two cores.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifarlens.cli import main
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.data.pipeline import shard
from cifarlens.distributed import World
from conftest import make_cifar10, make_cifar_archive

# A tiny LensNet with the modern recipe (no EMA, so the two runs differ only in how the
# batches were split and augmented): 900 training images, 2 epochs.
FLAGS = ["--dataset", "cifar10", "--no-download", "--model", "lensnet_light", "--recipe", "modern",
         "--set", "model.kwargs={widths: [8, 16], depths: [1, 1]}", "--batch-size", "64", "--seed", "0",
         "--no-report"]
# Test accuracy of the 2-process run may fall below the 1-process run's by this much: the
# ranks draw their own augmentations and their BatchNorm sees 32 images, not 64. A fault of
# data-parallel training (gradients summed, not averaged; both ranks on the same half) makes it
# worse; higher is chance (seen on an Intel Xeon VM: 0.86 against 0.80 on the 200 test images).
ACCURACY_TOLERANCE = 0.05


def cli(*args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifarlens.cli", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def history(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((run / "history.csv").open())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training on one process (in-process) and on two (torchrun, gloo); the two start
    from the official archive alone, which one of them extracts (both at once failed)."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_cifar10(root / "data", n_train_per_batch=200, n_test=200)
    common = [*FLAGS, "--data-dir", str(data.data_dir), "--epochs", "2"]
    assert main(["train", *common, "--out", str(root / "one")]) == 0
    archive = make_cifar_archive(root / "archive", n_train_per_batch=200, n_test=200)  # the same images
    proc = cli("train", *common, "--data-dir", str(archive.data_dir), "--out", str(root / "two"), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, data, proc


@pytest.mark.slow  # the two trainings of the runs fixture, ~15 s; CI runs it with the slow set
def test_two_processes_see_every_sample_once_per_epoch_and_agree_with_one(runs):
    root, _, _ = runs
    one, two = history(root / "one"), history(root / "two")
    # 900 train images, global batch 64, incomplete batch dropped: 14 * 64 per epoch on both
    assert [int(r["train_samples"]) for r in one] == [int(r["train_samples"]) for r in two] == [14 * 64] * 2
    assert [r["lr"] for r in one] == [r["lr"] for r in two]  # same number of optimizer steps
    acc = {name: json.loads((root / name / "metrics.json").read_text())["accuracy"] for name in ("one", "two")}
    assert acc["one"] > 0.5  # both learned something
    assert acc["two"] >= acc["one"] - ACCURACY_TOLERANCE, acc
    env = json.loads((root / "two" / "environment.json").read_text())
    assert env["world_size"] == 2 and json.loads((root / "one" / "environment.json").read_text())["world_size"] == 1
    assert env["command"][-2:] == ["--nproc", "2"]  # the command as given (the ranks' lacks --nproc)


@pytest.mark.slow
def test_only_rank_zero_writes(runs):
    root, _, proc = runs
    log = (root / "two" / "train.log").read_text().splitlines()
    assert sum(line.startswith("run folder") for line in log) == 1
    assert [line.split()[1] for line in log if line.startswith("epoch ")] == ["1/2", "2/2"]  # once each
    assert "2 processes" in log[0]
    # the epoch lines reached the terminal once too (rank 1 is silent)
    assert proc.stdout.count("epoch 1/2 ") == 1
    leftovers = [p.name for p in (root / "two").rglob("*") if ".tmp" in p.name]
    assert not leftovers


@pytest.mark.slow  # ~40 s of three two-process runs; CI runs it with the slow set
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(runs, tmp_path):
    _, data, _ = runs
    args = [*FLAGS, "--data-dir", str(data.data_dir), "--epochs", "5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = cli("train", *args, "--out", str(full), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]  # a rank's own message, if one fails

    proc = subprocess.Popen([sys.executable, "-m", "cifarlens.cli", "train", *args, "--out", str(cut), "--nproc", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (cut / "history.csv").is_file() and len(history(cut)) >= 2:
            break
        time.sleep(0.02)
    # as a scheduler would stop a job: torchrun passes SIGTERM on to the ranks, which stop as on Ctrl-C
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    done = len(history(cut))
    if done == 5:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    assert json.loads((cut / "run.json").read_text())["status"] == "interrupted"  # rank 0 recorded it
    assert proc.returncode == 143 and "continue with: cifarlens train --resume" in stderr, stderr[-2000:]
    # one such line (the launcher's, with --nproc); the ranks printed theirs too, without it
    assert stderr.count("continue with:") == 1 and f"--resume {cut} --nproc 2" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr

    resumed = cli("train", "--resume", str(cut), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # (history.csv is written just before the checkpoint: the kill may fall between the two)
    assert re.search(rf"resuming {re.escape(str(cut))} after epoch ({done - 1}|{done})/5",
                     (cut / "train.log").read_text())
    assert history(full) == history(cut)
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _rank_pids(launcher: int) -> dict[int, int]:
    """rank -> process id of the ranks a `train --nproc` launcher started (its children, by RANK)."""
    ranks = {}
    for child in subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = int(child)
    return ranks


def _start_and_wait_for_an_epoch(args: list[str], out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cifarlens.cli", "train", *args, "--out", str(out), "--nproc", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (
            (out / "history.csv").is_file() and len(history(out)) >= 1 and len(_rank_pids(proc.pid)) == 2):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    return proc


@pytest.mark.slow  # three two-process runs, ~40 s; CI runs it with the slow set
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl: Linux")
def test_a_lost_launcher_or_rank_stops_the_run_resumably_in_one_line(runs, tmp_path):
    """The launcher killed by SIGKILL left both ranks training on unseen, the run folder locked;
    rank 1 killed (as the OOM killer does) gave rank 0's 30-line gloo traceback and no way on."""
    _, data, _ = runs
    args = [*FLAGS, "--data-dir", str(data.data_dir), "--epochs", "200"]
    proc = _start_and_wait_for_an_epoch(args, tmp_path / "orphans")
    ranks = _rank_pids(proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ranks.values()):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())  # (zombies are reaped by init)
    assert json.loads((tmp_path / "orphans" / "run.json").read_text())["status"] == "interrupted"

    out = tmp_path / "lost"
    proc = _start_and_wait_for_an_epoch(args, out)
    os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
    stderr = proc.communicate(timeout=60)[1]
    lines = [line for line in stderr.splitlines() if not line.startswith(("cifarlens: torchrun", "run folder", "epoch "))]
    assert proc.returncode == 2 and len(lines) == 1, stderr[-3000:]
    assert (lines[0].startswith("cifarlens: error: a training process was lost (killed, or out of memory?)")
            or lines[0].startswith("cifarlens: error: a training process was ended by SIGKILL")), lines
    assert lines[0].endswith(f"; continue with: cifarlens train --resume {out} --nproc 2")
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


@pytest.mark.slow  # two-process runs, ~20 s; CI runs it with the slow set
def test_what_every_rank_says_is_said_once_and_an_empty_validation_shard_is_fine(tmp_path):
    """A missing --weights file was printed by each rank, then by torchrun's log, then by the
    launcher; a validation split of 1 image on 2 processes crashed rank 0 (torch.cat of nothing)."""
    data = make_cifar10(tmp_path / "data", n_train_per_batch=20, n_test=20)
    common = [*FLAGS, "--data-dir", str(data.data_dir), "--epochs", "1"]
    proc = cli("train", *common, "--weights", str(tmp_path / "nofile.pt"), "--out", str(tmp_path / "w"), "--nproc", "2")
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("cifarlens: torchrun")]
    assert proc.returncode == 2 and lines == [f"cifarlens: error: weights file {tmp_path / 'nofile.pt'} not found"], \
        proc.stderr[-3000:]
    assert not (tmp_path / "w").exists()
    # an image folder whose own val/ holds one image: none on rank 1
    from PIL import Image

    folders = tmp_path / "folders"
    for split, n in (("train", 8), ("val", 1), ("test", 2)):
        for c, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200)))[: 1 if split == "val" else 2]:
            (folders / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), colour).save(folders / split / c / f"{i}.png")
    proc = cli("train", "--dataset", "imagefolder", "--data-dir", str(folders), "--model", "lensnet_light",
               "--set", "model.kwargs={widths: [8, 16], depths: [1, 1]}", "--batch-size", "8", "--epochs", "1",
               "--no-report", "--out", str(tmp_path / "v"), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "v" / "run.json").read_text())["split_sizes"]["val"] == 1


@pytest.mark.slow  # a two-process run, ~15 s; CI runs it with the slow set
def test_two_processes_share_the_scores_of_pruned_epochs(runs, tmp_path):
    """train.prune_easy: each rank must score every image of the global batches, not only its
    own slice, or the ranks leave out different images (and half the scores stay 0)."""
    _, data, _ = runs
    out = tmp_path / "pruned"
    proc = cli("train", *FLAGS, "--data-dir", str(data.data_dir), "--epochs", "3", "--set", "train.prune_easy=0.5",
               "--out", str(out), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 14 global batches of 64 a whole epoch, round(14 * 0.75) = 10 in the pruned one, as one process
    assert [int(r["train_samples"]) for r in history(out)] == [14 * 64, 10 * 64, 14 * 64]
    assert "on 640 of 900 images" in (out / "train.log").read_text()
    scores = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["pruning"]["scores"]
    assert int((scores > 0).sum()) >= 14 * 64  # every image trained on has a score (4 of 900 may be in no batch)


def test_distributed_sits_below_the_engine():
    """The engine imports distributed; distributed (and the device resolution both use) never
    imports the engine, not even lazily when a process joins its world."""
    code = ("import sys, cifarlens.distributed as d; d.init('cpu'); d.all_reduce_sum(1.0); "
            "print(sorted(m for m in sys.modules if m.startswith('cifarlens')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'cifarlens.device'" in loaded and "'cifarlens.engine'" not in loaded, loaded
    from cifarlens import device, engine

    assert engine.resolve_device is device.resolve_device  # the old import path still works


def test_batches_are_sharded_across_ranks():
    split = Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    identity = lambda images, generator: images  # noqa: E731
    single = TensorLoader(split, 4, identity, device=torch.device("cpu"), shuffle=True, drop_last=True, seed=3)
    ranks = [TensorLoader(split, 2, identity, device=torch.device("cpu"), shuffle=True, drop_last=True, seed=3,
                          rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 2
    for whole, part0, part1 in zip(single, *ranks):
        # rank r holds the r-th half of the global batch one process would have drawn
        assert torch.equal(whole[1], torch.cat([part0[1], part1[1]]))
    # evaluation: contiguous shards that cover the split exactly once
    parts = [shard(split, World(r, 3)).labels for r in range(3)]
    assert torch.equal(torch.cat(parts), split.labels) and [len(p) for p in parts] == [3, 3, 4]


# One epoch of a DDP-wrapped linear classifier on 2 gloo processes (joined as `cifarlens train
# --nproc` joins them), where only rank 1's images are huge: its first loss is far over the
# divergence limit, rank 0's is not. Each rank writes what ended its epoch.
DIVERGE_ON_RANK_ONE = """
import os
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cifarlens import distributed
from cifarlens.data.base import Split
from cifarlens.data.loader import TensorLoader
from cifarlens.engine import Precision, TrainingDiverged, train_one_epoch

world, device, started = distributed.init("cpu")
torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)))
scale = 1e6 if world.rank == 1 else 1.0
split = Split(torch.randint(0, 256, (8, 3, 2, 2), dtype=torch.uint8), torch.arange(8) % 3)
loader = TensorLoader(split, 4, lambda x, g: scale * x.float() / 255, device=device)
try:
    train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), None, Precision(device))
    outcome = "finished"
except TrainingDiverged as err:
    outcome = f"{type(err).__name__}: {err}"
Path(sys.argv[1], f"rank{world.rank}.txt").write_text(outcome)
distributed.shutdown(started)
# Two ranks that end at the same moment can abort (SIGABRT) in the interpreter's finalization, where
# gloo's worker threads still hold work (upstream: pytorch/pytorch#179291): 4-7 of 16 such bare
# scripts on a loaded 2-core machine, none of 8 `train --nproc 2` runs. Not what this test is about.
os._exit(0)
"""


@pytest.mark.slow  # two processes, ~5 s; CI runs it with the slow set
def test_a_loss_that_diverges_on_one_rank_stops_every_rank_alike(tmp_path):
    """Rank 0 once went on into its backward pass, whose gradient all-reduce waited for rank 1,
    which had stopped; torchrun then ended rank 0, and the run was recorded as interrupted."""
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE_ON_RANK_ONE)
    # as `cifarlens train --nproc 2` launches; a rank left waiting fails the test by the timeout
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1], outcomes  # the same error, naming rank 1's step and loss
    assert outcomes[0].startswith("TrainingExploded: the training loss became") and "at step 1 of" in outcomes[0]


SYNC_BUFFERS = """
import sys, torch, torch.distributed as dist
from cifarlens.distributed import broadcast_buffers
dist.init_process_group("gloo")
rank = dist.get_rank()
bn = torch.nn.BatchNorm2d(3)
bn.train()
bn(torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(rank)))  # each rank's own statistics
before = bn.running_mean.clone()
broadcast_buffers(bn)
gathered = [torch.zeros(3) for _ in range(2)]
dist.all_gather(gathered, bn.running_mean)
open(f"{sys.argv[1]}/rank{rank}.txt", "w").write(
    f"{torch.equal(gathered[0], gathered[1])} {rank == 0 or not torch.equal(before, bn.running_mean)}")
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes' start, ~10 s
def test_every_rank_validates_with_rank_zeros_batchnorm_statistics(tmp_path):
    """Rank 1 validated its shard with its own EMA's statistics, which no saved model holds, so a
    resumed run's validation loss differed from an uninterrupted one's (the weights did not)."""
    script = tmp_path / "sync.py"
    script.write_text(SYNC_BUFFERS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["True True"] * 2


def test_bad_distributed_settings_are_clear_errors(tmp_path, capsys):
    root, data = tmp_path, make_cifar10(tmp_path / "data", n_train_per_batch=20, n_test=20)
    common = ["train", *FLAGS, "--data-dir", str(data.data_dir), "--out", str(root / "bad")]
    assert main([*common, "--batch-size", "63", "--nproc", "2"]) == 2
    assert "divisible by the 2 processes" in capsys.readouterr().err
    assert main([*common, "--set", "train.sync_bn=true", "--device", "cpu", "--nproc", "2"]) == 2
    assert "SyncBatchNorm runs on GPUs only" in capsys.readouterr().err
    assert main([*common, "--nproc", "0"]) == 2
    assert not (root / "bad").exists()
    capsys.readouterr()
    # run-folder mistakes: one line from the launcher, before torchrun (each rank printed its own, then torchrun's)
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("mine")
    for args, words in ((["train", *FLAGS, "--data-dir", str(data.data_dir), "--out", str(root / "notes")],
                         "is a non-empty folder that is not a cifarlens run"),
                        (["train", "--resume", str(root / "nothing")], "nothing")):
        assert main([*args, "--nproc", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "torchrun" not in err[0], err


@pytest.mark.slow  # two CLI processes (each imports torch): CI's slow set runs it
def test_torchruns_variables_left_in_the_shell_are_one_line(tmp_path):
    """WORLD_SIZE=2 without torchrun ended in init_process_group's traceback (MASTER_ADDR expected);
    WORLD_SIZE=abc printed its error, then a traceback from the module's exit path."""
    import os

    data = make_cifar10(tmp_path / "data", n_train_per_batch=20, n_test=20)
    for world, words in (("2", "WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT not: this is not a torchrun "
                                "process"), ("abc", "RANK / WORLD_SIZE / LOCAL_RANK must be integers")):
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run([sys.executable, "-m", "cifarlens.cli", "train", *FLAGS, "--data-dir", str(data.data_dir),
                               "--out", str(tmp_path / "run")], env=env | {"WORLD_SIZE": world, "RANK": "0"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cifarlens: error: {words}"), proc.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")  # before the CPU runs fixture
def test_gpu_data_parallel_with_sync_batchnorm(runs, tmp_path):
    _, data, _ = runs
    proc = cli("train", *FLAGS, "--data-dir", str(data.data_dir), "--epochs", "2", "--out", str(tmp_path / "gpu"),
               "--device", "cuda", "--set", "train.sync_bn=true", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(r["train_samples"]) for r in history(tmp_path / "gpu")] == [14 * 64] * 2
