"""Metrics against hand-computed 3-class examples, then against scikit-learn on random cases."""

from __future__ import annotations

from fractions import Fraction as Fr

import pytest
import torch
import torch.nn.functional as F

from cifarlens.metrics import (
    classification_metrics,
    classification_report_text,
    confusion_matrix,
    most_confused_pairs,
    row_normalize,
    summarize,
    topk_accuracy,
)

NAMES3 = ["cat", "dog", "frog"]

# Hand example. Per true class, the predictions are
#   cat  (4): cat cat cat dog
#   dog  (3): cat dog dog
#   frog (3): cat dog frog
# given here in a shuffled order so the test also checks the counting.
LABELS = [2, 0, 1, 0, 2, 1, 0, 2, 1, 0]
PREDS = [1, 0, 0, 1, 2, 1, 0, 0, 1, 0]
CM = [
    [3, 1, 0],
    [1, 2, 0],
    [1, 1, 1],
]
# column sums (times predicted): 5, 4, 1; row sums (support): 4, 3, 3
PRECISION = [Fr(3, 5), Fr(2, 4), Fr(1, 1)]
RECALL = [Fr(3, 4), Fr(2, 3), Fr(1, 3)]
F1 = [Fr(2, 3), Fr(4, 7), Fr(1, 2)]  # 2tp / (2tp + fp + fn): 6/9, 4/7, 2/4
SUPPORT = [4, 3, 3]
ACCURACY = Fr(6, 10)
PRECISION_MACRO = Fr(7, 10)  # (3/5 + 1/2 + 1) / 3
RECALL_MACRO = Fr(7, 12)  # (3/4 + 2/3 + 1/3) / 3
F1_MACRO = Fr(73, 126)  # (2/3 + 4/7 + 1/2) / 3
PRECISION_WEIGHTED = Fr(69, 100)  # (4*3/5 + 3*1/2 + 3*1) / 10
RECALL_WEIGHTED = Fr(6, 10)  # always equals accuracy
F1_WEIGHTED = Fr(247, 420)  # (4*2/3 + 3*4/7 + 3*1/2) / 10


def approx(x) -> pytest.approx:
    return pytest.approx(float(x), abs=1e-12)


def test_confusion_matrix_hand_example():
    cm = confusion_matrix(torch.tensor(LABELS), torch.tensor(PREDS), 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == CM


def test_confusion_matrix_counts_absent_classes_and_rejects_bad_input():
    cm = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 0]), 4)
    assert cm.shape == (4, 4) and cm.sum() == 2 and cm[0, 0] == 2
    assert confusion_matrix(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3).sum() == 0
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, -1]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


def test_classification_metrics_hand_example():
    m = classification_metrics(torch.tensor(CM), NAMES3)
    assert m["accuracy"] == approx(ACCURACY)
    assert m["precision_macro"] == approx(PRECISION_MACRO)
    assert m["recall_macro"] == approx(RECALL_MACRO)
    assert m["f1_macro"] == approx(F1_MACRO)
    assert m["precision_weighted"] == approx(PRECISION_WEIGHTED)
    assert m["recall_weighted"] == approx(RECALL_WEIGHTED)
    assert m["f1_weighted"] == approx(F1_WEIGHTED)
    assert m["num_samples"] == 10
    assert m["confusion_matrix"] == CM
    for row, name, p, r, f, s in zip(m["per_class"], NAMES3, PRECISION, RECALL, F1, SUPPORT):
        assert row == {"name": name, "precision": approx(p), "recall": approx(r), "f1": approx(f), "support": s}
        assert type(row["precision"]) is float and type(row["support"]) is int


def test_classification_metrics_zero_division_hand_example():
    # "dog" is never predicted, "frog" neither appears nor is predicted.
    cm = confusion_matrix(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0]), 3)
    assert cm.tolist() == [[2, 0, 0], [2, 0, 0], [0, 0, 0]]
    m = classification_metrics(cm, NAMES3)
    assert [r["precision"] for r in m["per_class"]] == [approx(Fr(1, 2)), 0.0, 0.0]
    assert [r["recall"] for r in m["per_class"]] == [1.0, 0.0, 0.0]
    assert [r["f1"] for r in m["per_class"]] == [approx(Fr(2, 3)), 0.0, 0.0]
    assert m["accuracy"] == approx(Fr(1, 2))
    # macro averages over the classes present (in labels or predictions): frog is left out, as by
    # scikit-learn's default; counted as 0 it would give 1/6, 1/3 and 2/9
    assert m["classes_absent"] == ["frog"]
    assert m["precision_macro"] == approx(Fr(1, 4))
    assert m["recall_macro"] == approx(Fr(1, 2))
    assert m["f1_macro"] == approx(Fr(1, 3))
    assert m["precision_weighted"] == approx(Fr(1, 4))
    assert m["recall_weighted"] == approx(Fr(1, 2))
    assert m["f1_weighted"] == approx(Fr(1, 3))


def test_classification_metrics_empty_and_mismatched_names():
    m = classification_metrics(torch.zeros(3, 3, dtype=torch.long), NAMES3)
    assert m["accuracy"] == 0.0 and m["f1_weighted"] == 0.0 and m["num_samples"] == 0
    with pytest.raises(ValueError):
        classification_metrics(torch.tensor(CM), ["a", "b"])


def test_row_normalize_hand_example():
    got = row_normalize(torch.tensor(CM))
    want = [[3 / 4, 1 / 4, 0], [1 / 3, 2 / 3, 0], [1 / 3, 1 / 3, 1 / 3]]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


def test_topk_accuracy_hand_example():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.1],  # label 2 is 2nd
            [0.7, 0.1, 0.1, 0.1],  # label 0 is 1st
            [0.4, 0.3, 0.2, 0.1],  # label 3 is 4th
        ]
    )
    labels = torch.tensor([2, 0, 3])
    assert topk_accuracy(scores, labels, 1) == approx(Fr(1, 3))
    assert topk_accuracy(scores, labels, 2) == approx(Fr(2, 3))
    assert topk_accuracy(scores, labels, 3) == approx(Fr(2, 3))
    assert topk_accuracy(scores, labels, 4) == 1.0
    assert topk_accuracy(scores, labels, 10) == 1.0  # k > C: every sample is a hit
    with pytest.raises(ValueError):
        topk_accuracy(scores, labels, 0)


def test_most_confused_pairs_order():
    cm = torch.tensor([[5, 2, 7], [0, 4, 2], [1, 0, 9]])
    assert most_confused_pairs(cm, NAMES3) == [
        ("cat", "frog", 7),
        ("cat", "dog", 2),  # tie with (dog, frog): row-major order
        ("dog", "frog", 2),
        ("frog", "cat", 1),
    ]  # zeros and the diagonal are left out
    assert most_confused_pairs(cm, NAMES3, k=2) == [("cat", "frog", 7), ("cat", "dog", 2)]
    assert most_confused_pairs(torch.eye(3, dtype=torch.long) * 4, NAMES3) == []


def test_summarize_keys_and_values():
    torch.manual_seed(0)
    logits3 = torch.randn(50, 3)
    labels3 = torch.randint(0, 3, (50,))
    m3 = summarize(logits3, labels3, NAMES3)
    assert "top5_accuracy" not in m3
    assert {"accuracy", "f1_macro", "per_class", "confusion_matrix", "mean_confidence", "nll"} <= m3.keys()
    assert m3["nll"] == pytest.approx(F.cross_entropy(logits3, labels3).item(), rel=1e-5)
    assert m3["mean_confidence"] == pytest.approx(logits3.softmax(1).max(1).values.mean().item(), rel=1e-5)
    assert m3["accuracy"] == pytest.approx((logits3.argmax(1) == labels3).double().mean().item())
    assert m3["confusion_matrix"] == confusion_matrix(labels3, logits3.argmax(1), 3).tolist()

    logits10 = torch.randn(64, 10).to(torch.bfloat16)  # low precision input, as from autocast
    labels10 = torch.randint(0, 10, (64,))
    m10 = summarize(logits10, labels10, [f"c{i}" for i in range(10)])
    assert m10["top5_accuracy"] == topk_accuracy(logits10.float(), labels10, 5)
    assert m10["nll"] == pytest.approx(F.cross_entropy(logits10.float(), labels10).item(), rel=1e-5)
    assert all(isinstance(v, float) for k, v in m10.items() if k not in ("per_class", "confusion_matrix", "num_samples", "classes_absent"))
    with pytest.raises(ValueError):
        summarize(logits3, labels3, ["a", "b"])


def test_report_text_layout():
    m = classification_metrics(torch.tensor(CM), NAMES3)
    text = classification_report_text(m)
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["cat", "0.6000", "0.7500", "0.6667", "4"]
    assert [ln.split()[:2] for ln in lines[-3:]] == [["accuracy", "0.6000"], ["macro", "avg"], ["weighted", "avg"]]
    assert lines[-2].split()[2:] == ["0.7000", "0.5833", "0.5794", "10"]
    # columns line up: every row ends its support at the same column
    assert len({len(ln) for ln in lines if ln and ln.split()[-1].isdigit()}) == 1

    long_names = [f"class_{i:03d}_" + "x" * (i % 50) for i in range(100)]
    cm100 = torch.diag(torch.arange(1, 101))
    text100 = classification_report_text(classification_metrics(cm100, long_names))
    rows = text100.splitlines()
    assert len(rows) == 1 + 1 + 100 + 1 + 3
    assert max(len(r) for r in rows) <= 80  # long names are shortened
    assert "class_000_" in text100 and "…" in text100


sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn_random(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes = 7
    n = int(torch.randint(20, 200, (1,), generator=g))
    # class 5 never occurs as a label (zero support); class 3 is never predicted
    labels = torch.tensor([0, 1, 2, 3, 4, 6])[torch.randint(0, 6, (n,), generator=g)]
    logits = torch.randn(n, num_classes, generator=g)
    logits[:, 3] = logits.min(dim=1).values - 0.5  # lowest score, yet a finite probability
    logits[torch.arange(n), labels] += 1.0  # better than chance, so metrics are not all ~0
    preds = logits.argmax(1)
    names = [f"c{i}" for i in range(num_classes)]
    all_labels = list(range(num_classes))
    y, p = labels.numpy(), preds.numpy()

    cm = confusion_matrix(labels, preds, num_classes)
    assert cm.tolist() == sklearn_metrics.confusion_matrix(y, p, labels=all_labels).tolist()

    m = classification_metrics(cm, names)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p))
    prec, rec, f1, sup = sklearn_metrics.precision_recall_fscore_support(
        y, p, labels=all_labels, zero_division=0, average=None
    )
    assert [r["precision"] for r in m["per_class"]] == pytest.approx(prec.tolist())
    assert [r["recall"] for r in m["per_class"]] == pytest.approx(rec.tolist())
    assert [r["f1"] for r in m["per_class"]] == pytest.approx(f1.tolist())
    assert [r["support"] for r in m["per_class"]] == sup.tolist()
    assert m["per_class"][5]["support"] == 0 and m["per_class"][3]["precision"] == 0.0
    # averages over the classes in the labels or predictions: scikit-learn's default (labels=None)
    assert m["classes_absent"] == ([] if 5 in p else ["c5"])
    for avg in ("macro", "weighted"):
        p_, r_, f_, _ = sklearn_metrics.precision_recall_fscore_support(y, p, zero_division=0, average=avg)
        assert m[f"precision_{avg}"] == pytest.approx(p_)
        assert m[f"recall_{avg}"] == pytest.approx(r_)
        assert m[f"f1_{avg}"] == pytest.approx(f_)

    for k in (1, 2, 3, 5):
        want = sklearn_metrics.top_k_accuracy_score(y, logits.numpy(), k=k, labels=all_labels)
        assert topk_accuracy(logits, labels, k) == pytest.approx(want)

    s = summarize(logits, labels, names)
    assert s["top5_accuracy"] == pytest.approx(
        sklearn_metrics.top_k_accuracy_score(y, logits.numpy(), k=5, labels=all_labels)
    )
    probs = logits.double().softmax(1).numpy()
    assert s["nll"] == pytest.approx(sklearn_metrics.log_loss(y, probs, labels=all_labels), rel=1e-6)
