"""Test accuracy of a finished run's weights under several sets of test-time augmentation views.

    python benchmarks/tta_views.py RUN_DIR [--data-dir DIR]

TTA costs nothing in training time (what ``cifarlens bench`` and ``--time-budget`` count), so
more views would be a free gain if they helped. This evaluates the run's weights on its test
split with: no TTA, the flip, the recipe's views (``train.tta_translate 1``: the flip plus 1-pixel
diagonal moves, airbench94's ``tta_level=2``, cifarlens.tta), 2-pixel moves instead, all four
1-pixel diagonals, and the flip of all nine 1-pixel shifts, each with the number of views and the
seconds it took. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cifarlens.inference import load_run
from cifarlens.tta import tta_views

FOUR = [(1, 1), (-1, -1), (1, -1), (-1, 1)]
NINE = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` moved ``dy`` pixels down and ``dx`` right, the border filled by reflection (as cifarlens.tta)."""
    if not dy and not dx:
        return x
    t, (h, w) = max(abs(dy), abs(dx)), x.shape[-2:]
    padded = F.pad(x, (t, t, t, t), mode="reflect")
    return padded[..., t - dy:t - dy + h, t - dx:t - dx + w]


def view_sets() -> dict[str, list[tuple[float, int, int, bool]]]:
    """name -> (weight, dy, dx, mirrored) of each view; the weights sum to 1."""
    plain = [(0.25, 0, 0, False), (0.25, 0, 0, True)]
    return {
        "none": [(1.0, 0, 0, False)],
        "flip": [(0.5, 0, 0, False), (0.5, 0, 0, True)],
        "flip + 2-px diagonal moves": plain + [(0.125, d, d, m) for d in (2, -2) for m in (False, True)],
        "flip + the four 1-px diagonal moves": plain + [(0.0625, a, b, m) for a, b in FOUR for m in (False, True)],
        "flip x the nine 1-px shifts, equal weights": [(1 / 18, a, b, m) for a, b in NINE for m in (False, True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir", help="where the run's dataset is now (default: its own data_dir)")
    args = parser.parse_args()
    run = load_run(args.run_dir)
    test = run.data(args.data_dir).test
    mean = torch.tensor(run.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(run.info.std).view(1, -1, 1, 1)
    model = run.model.eval().to(memory_format=torch.channels_last)

    def accuracy(logits_of) -> float:
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test), 500):
                x = ((test.images[i:i + 500].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
                correct += int((logits_of(x).argmax(1) == test.labels[i:i + 500]).sum())
        return 100 * correct / len(test)

    began = time.perf_counter()
    recipe = accuracy(lambda x: sum(w * model(v) for w, v in tta_views(x, 1)))
    print(f"the recipe's views (flip + 1-px diagonal moves, cifarlens.tta): {recipe:.2f} % "
          f"(6 views, {time.perf_counter() - began:.0f} s)", flush=True)
    for name, views in view_sets().items():
        began = time.perf_counter()
        acc = accuracy(lambda x, views=views: sum(w * model(shifted(x, dy, dx).flip(3) if m else shifted(x, dy, dx))
                                                  for w, dy, dx, m in views))
        print(f"{name}: {acc:.2f} % ({len(views)} views, {time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
