"""Accuracy of trained runs under Gaussian noise of std 0.02 to 0.10 (CIFAR-10-C's gaussian_noise
levels are 0.04 to 0.10), a Gaussian blur of sigma 0.7 and JPEG at quality 50, on a seeded
2,000-image subset of each run's test split: one JSON line per run. The noise-collapse table of
docs/explain-and-report.md comes from it:

    python benchmarks/noise_sweep.py runs/a runs/b ...

Plain, fixed definitions (not cifarlens.corruptions) so that the figures stay comparable.
"""
import argparse, json, torch
from cifarlens.api import load_run
import io
import numpy as np
from PIL import Image

def subset_indices(n, k, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:k].sort().values

def gaussian_noise(x, std, g):  # CIFAR-10-C's gaussian_noise: x/255 + N(0, std^2), clipped
    y = x.float() / 255 + std * torch.randn(x.shape, generator=g)
    return (y.clamp(0, 1) * 255).round().to(torch.uint8)

def gaussian_blur(x, sigma):
    r = 3
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2); k = k / k.sum()
    b, c, h, w = x.shape
    y = torch.nn.functional.pad(x.float().reshape(b * c, 1, h, w), (r, r, r, r), mode="reflect")
    y = torch.nn.functional.conv2d(torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w).round().clamp(0, 255).to(torch.uint8)

def jpeg(x, q):
    out = []
    for a in x.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO(); Image.fromarray(a).save(buf, format="JPEG", quality=q); buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trained run folders")
args = parser.parse_args()
torch.set_num_threads(2)
for path in args.runs:
    run = load_run(path, device="cpu")
    test = run.data().test
    idx = subset_indices(len(test), 2000, 0)
    x, y = test.images[idx], test.labels[idx]
    def acc(images):
        hits = 0
        for b in range(0, len(y), 500):
            hits += int((run.predict_proba(images[b:b+500]).argmax(1) == y[b:b+500]).sum())
        return hits / len(y)
    row = {"run": path, "clean": acc(x)}
    for std in (0.02, 0.04, 0.06, 0.08, 0.10):
        row[f"noise{std}"] = acc(gaussian_noise(x, std, torch.Generator().manual_seed(1)))
    row["blur0.7"] = acc(gaussian_blur(x, 0.7))
    row["jpeg50"] = acc(jpeg(x, 50))
    print(json.dumps(row), flush=True)
