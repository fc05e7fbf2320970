"""Plots render to valid PNG files, leave no figures open and no temp files behind."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from cifarlens.plots import plot_confusion_matrix, plot_training_curves, row_normalize


def open_png(path):
    with Image.open(path) as im:
        im.verify()  # checks the PNG structure and CRCs
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def only_file(folder):
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 1, files  # the temp file was renamed, not left behind
    return files[0]


def test_row_normalize_zero_row_stays_zero():
    cm = torch.tensor([[2, 2, 0], [0, 0, 0], [1, 0, 3]])
    got = row_normalize(cm)
    want = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.75]], dtype=torch.float64)
    assert torch.equal(got, want)
    assert not torch.isnan(got).any()


def test_confusion_matrix_small(tmp_path):
    cm = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # last class has no support
    target = tmp_path / "cm.png"
    target.write_bytes(b"old")  # replaced atomically
    path = plot_confusion_matrix(cm, ["cat", "dog", "frog"], target, title="test")
    assert path == target
    w, h = open_png(path)
    assert w > 600 and h > 300 and w > h  # two panels side by side
    assert only_file(tmp_path) == "cm.png"
    assert plt.get_fignums() == []


def test_dollar_signs_in_class_and_run_names_are_text_not_mathtext(tmp_path):
    """A class folder named like this, or a run folder 'lr_$1_vs_$2', crashed train and evaluate
    after the training (matplotlib's mathtext parser)."""
    cm = torch.tensor([[3, 1], [0, 2]])
    path = plot_confusion_matrix(cm, [r"$\frac{a}{$", "$5 coin"], tmp_path / "cm.png", title="lr_$1_vs_$2: test")
    open_png(path)


def test_chinese_class_names_are_drawn_with_an_installed_font(tmp_path, recwarn):
    """They were boxes, with matplotlib's "Glyph 34013 missing from font(s) DejaVu Sans" on the terminal;
    the fallback holds while a figure is drawn, and matplotlib's settings are the caller's again after."""
    import matplotlib

    from cifarlens.explain.figures import plot_class_averages
    from cifarlens.plots import glyph_fallback

    with matplotlib.rc_context({"font.family": ["serif"]}):  # a family the user chose is theirs
        assert glyph_fallback() is None
    with matplotlib.rc_context({"font.family": ["sans-serif"]}):
        if glyph_fallback() is None:
            pytest.skip("no font with Chinese glyphs installed (e.g. apt-get install fonts-droid-fallback)")
        open_png(plot_confusion_matrix(torch.tensor([[3, 1], [0, 2]]), ["blue 蓝", "red 红"], tmp_path / "cm.png"))
        plot_class_averages(torch.rand(2, 8, 8), torch.tensor([1, 1]), ["blue 蓝", "red 红"], tmp_path / "avg.png")
        assert matplotlib.rcParams["font.family"] == ["sans-serif"]  # nothing global changed
    assert not [w for w in recwarn if "missing from font" in str(w.message)], [str(w.message) for w in recwarn]


def test_confusion_matrix_100_classes_long_names(tmp_path):
    g = torch.Generator().manual_seed(0)
    # CIFAR-100-like names, a few of them long (rendering cost grows with characters)
    names = [f"class_{i:03d}" + ("_with_a_rather_long_name" if i % 10 == 0 else "") for i in range(100)]
    labels = torch.randint(0, 100, (5000,), generator=g)
    preds = torch.where(torch.rand(5000, generator=g) < 0.6, labels, torch.randint(0, 100, (5000,), generator=g))
    cm = torch.bincount(labels * 100 + preds, minlength=100 * 100).reshape(100, 100)
    out = tmp_path / "sub" / "cm100.png"  # missing folders are created
    plot_confusion_matrix(cm, names, out)
    w, h = open_png(out)
    assert w > 2000 and h > 1000  # scaled up so every name fits
    assert plt.get_fignums() == []


def test_confusion_matrix_rejects_wrong_names(tmp_path):
    with pytest.raises(ValueError):
        plot_confusion_matrix(torch.eye(3, dtype=torch.long), ["a", "b"], tmp_path / "cm.png")
    assert list(tmp_path.iterdir()) == []


def test_training_curves_single_epoch_missing_keys(tmp_path):
    history = [{"epoch": 1, "train_loss": 2.1, "val_loss": 1.9, "val_acc": 0.31, "lr": 0.1}]  # no train_acc
    path = plot_training_curves(history, tmp_path / "curves.png")
    w, h = open_png(path)
    assert w > 600 and h > 200
    assert plt.get_fignums() == []


def test_training_curves_many_epochs(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": 2.2 / e if e % 7 else None,  # a few gaps
            "train_acc": 1 - 0.5 / e,
            "val_acc": 1 - 0.6 / e,
            "lr": 0.1 * 0.9**e,  # spans > 1 decade: log scale
        }
        for e in range(1, 61)
    ]
    open_png(plot_training_curves(history, tmp_path / "curves.png"))
    open_png(plot_training_curves([{"epoch": 1}], tmp_path / "empty.png"))  # nothing to draw
    assert plt.get_fignums() == []
