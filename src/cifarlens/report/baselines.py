"""Published test results on CIFAR-10, CIFAR-100 and Fashion-MNIST, as data, each cited.

Every figure below is copied as published (test error for the CIFAR papers, test
accuracy for Fashion-MNIST), with the table it comes from. Nothing here was measured
by cifarlens. ``accuracy`` and ``error`` are both given; the one that was not
published is derived as 100 minus the other.

How the figures were checked (2025): He et al. 2016 Table 6 against the paper and
independent reproductions' READMEs; pre-activation ResNets and WRNs against the WRN
authors' README (github.com/szagoruyko/wide-residual-networks: "median of 5 runs",
mean/std normalisation) and the resnet-1k-layers README; DenseNet against the
authors' README (github.com/liuzhuang13/DenseNet); Fashion-MNIST against the text of
arXiv:1708.07747 Table 3. Rows we could not check (for example WRN-16-8 on CIFAR-100,
and the ZCA-whitened WRN figures of the paper's first arXiv version) are left out.

Augmentation: "standard crop+flip" is the "+" setting of these papers (zero-pad by 4
pixels, random 32x32 crop, random horizontal flip); "none" means no augmentation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "BASELINES", "DATASETS", "RECIPE_SOURCES", "Baseline", "Citation", "baselines_for", "citations", "format_baselines", "text_table",
]

DATASETS = ("cifar10", "cifar100", "fashion-mnist")  # the names used by cifarlens' dataset registry
STANDARD = "standard crop+flip"
NONE = "none"


@dataclass(frozen=True)
class Citation:
    authors: str
    year: int
    title: str
    venue: str
    arxiv: str

    def short(self) -> str:
        """"He et al. 2016", "Zagoruyko & Komodakis 2016"."""
        names = [a.split()[-1] for a in self.authors.split(", ")]
        who = names[0] if len(names) == 1 else " & ".join(names) if len(names) == 2 else f"{names[0]} et al."
        return f"{who} {self.year}"

    def full(self) -> str:
        return f"{self.authors} ({self.year}). {self.title}. {self.venue}. arXiv:{self.arxiv}."


@dataclass(frozen=True)
class Baseline:
    dataset: str
    model: str
    params: str | None  # parameter count as printed ("0.27M"); None where the paper gives none
    published: float  # the figure as printed, in percent
    metric: str  # "error" or "accuracy": what ``published`` is
    augmentation: str
    citation: Citation
    table: str  # where in the paper, e.g. "Table 6"
    note: str = ""
    cifarlens_model: str | None = None  # the registered cifarlens model of the same architecture

    def __post_init__(self):
        if self.metric not in ("error", "accuracy"):
            raise ValueError(f"metric must be 'error' or 'accuracy', got {self.metric!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}")

    @property
    def error(self) -> float:
        return self.published if self.metric == "error" else round(100.0 - self.published, 4)

    @property
    def accuracy(self) -> float:
        return self.published if self.metric == "accuracy" else round(100.0 - self.published, 4)


HE_2016 = Citation("K. He, X. Zhang, S. Ren, J. Sun", 2016, "Deep Residual Learning for Image Recognition",
                   "CVPR 2016", "1512.03385")
HE_2016_IDENTITY = Citation("K. He, X. Zhang, S. Ren, J. Sun", 2016, "Identity Mappings in Deep Residual Networks",
                            "ECCV 2016", "1603.05027")
WRN_2016 = Citation("S. Zagoruyko, N. Komodakis", 2016, "Wide Residual Networks", "BMVC 2016", "1605.07146v4")
DENSENET_2017 = Citation("G. Huang, Z. Liu, L. van der Maaten, K. Q. Weinberger", 2017,
                         "Densely Connected Convolutional Networks", "CVPR 2017", "1608.06993")
FASHION_2017 = Citation("H. Xiao, K. Rasul, R. Vollgraf", 2017,
                        "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms",
                        "arXiv preprint", "1708.07747")

# cifarlens recipes that follow a paper's training (cifarlens.recipes): the report marks its rows
RECIPE_SOURCES = {"he2016": HE_2016, "wrn2016": WRN_2016}

_DENSE_NOAUG = "dropout 0.2 after each conv (no augmentation)"
_WRN = "median of 5 runs; mean/std normalisation"

BASELINES: tuple[Baseline, ...] = (
    # --- CIFAR-10 -----------------------------------------------------------------------
    Baseline("cifar10", "ResNet-20", "0.27M", 8.75, "error", STANDARD, HE_2016, "Table 6", cifarlens_model="resnet20"),
    Baseline("cifar10", "ResNet-32", "0.46M", 7.51, "error", STANDARD, HE_2016, "Table 6", cifarlens_model="resnet32"),
    Baseline("cifar10", "ResNet-44", "0.66M", 7.17, "error", STANDARD, HE_2016, "Table 6"),
    Baseline("cifar10", "ResNet-56", "0.85M", 6.97, "error", STANDARD, HE_2016, "Table 6", cifarlens_model="resnet56"),
    Baseline("cifar10", "ResNet-110", "1.7M", 6.43, "error", STANDARD, HE_2016, "Table 6",
             note="best of 5 runs; mean 6.61 ± 0.16", cifarlens_model="resnet110"),
    Baseline("cifar10", "ResNet-1202", "19.4M", 7.93, "error", STANDARD, HE_2016, "Table 6",
             note="worse than ResNet-110; the authors attribute it to overfitting"),
    Baseline("cifar10", "Pre-act ResNet-164", "1.7M", 5.46, "error", STANDARD, HE_2016_IDENTITY, "Table 4"),
    Baseline("cifar10", "Pre-act ResNet-1001", "10.2M", 4.92, "error", STANDARD, HE_2016_IDENTITY, "Table 4",
             note="mini-batch 128; 4.62 with mini-batch 64 (abstract)"),
    Baseline("cifar10", "WRN-16-8", "11.0M", 4.27, "error", STANDARD, WRN_2016, "Table 5",
             note=_WRN, cifarlens_model="wrn16_8"),
    Baseline("cifar10", "WRN-28-10", "36.5M", 4.00, "error", STANDARD, WRN_2016, "Table 5",
             note=_WRN, cifarlens_model="wrn28_10"),
    Baseline("cifar10", "WRN-28-10 + dropout", "36.5M", 3.89, "error", STANDARD, WRN_2016, "Table 6", note=_WRN),
    Baseline("cifar10", "DenseNet-BC (L=100, k=12)", "0.8M", 5.92, "error", NONE, DENSENET_2017, "Table 2",
             note=_DENSE_NOAUG),
    Baseline("cifar10", "DenseNet-BC (L=100, k=12)", "0.8M", 4.51, "error", STANDARD, DENSENET_2017, "Table 2"),
    Baseline("cifar10", "DenseNet-BC (L=250, k=24)", "15.3M", 5.19, "error", NONE, DENSENET_2017, "Table 2",
             note=_DENSE_NOAUG),
    Baseline("cifar10", "DenseNet-BC (L=250, k=24)", "15.3M", 3.62, "error", STANDARD, DENSENET_2017, "Table 2"),
    Baseline("cifar10", "DenseNet-BC (L=190, k=40)", "25.6M", 3.46, "error", STANDARD, DENSENET_2017, "Table 2"),
    # --- CIFAR-100 ----------------------------------------------------------------------
    Baseline("cifar100", "Pre-act ResNet-164", "1.7M", 24.33, "error", STANDARD, HE_2016_IDENTITY, "Table 4"),
    Baseline("cifar100", "Pre-act ResNet-1001", "10.2M", 22.71, "error", STANDARD, HE_2016_IDENTITY, "Table 4"),
    Baseline("cifar100", "WRN-28-10", "36.5M", 19.25, "error", STANDARD, WRN_2016, "Table 5", note=_WRN,
             cifarlens_model="wrn28_10"),
    Baseline("cifar100", "WRN-28-10 + dropout", "36.5M", 18.85, "error", STANDARD, WRN_2016, "Table 6", note=_WRN),
    Baseline("cifar100", "DenseNet-BC (L=100, k=12)", "0.8M", 24.15, "error", NONE, DENSENET_2017, "Table 2",
             note=_DENSE_NOAUG),
    Baseline("cifar100", "DenseNet-BC (L=100, k=12)", "0.8M", 22.27, "error", STANDARD, DENSENET_2017, "Table 2"),
    Baseline("cifar100", "DenseNet-BC (L=250, k=24)", "15.3M", 19.64, "error", NONE, DENSENET_2017, "Table 2",
             note=_DENSE_NOAUG),
    Baseline("cifar100", "DenseNet-BC (L=250, k=24)", "15.3M", 17.60, "error", STANDARD, DENSENET_2017, "Table 2"),
    Baseline("cifar100", "DenseNet-BC (L=190, k=40)", "25.6M", 17.18, "error", STANDARD, DENSENET_2017, "Table 2"),
    # --- Fashion-MNIST: the authors' benchmark is of scikit-learn classifiers on raw pixels ---
    Baseline("fashion-mnist", "SVC (C=10, kernel=rbf)", None, 89.7, "accuracy", NONE, FASHION_2017, "Table 3",
             note="scikit-learn on raw pixels; mean of 5 runs with shuffled training data; best in the table"),
    Baseline("fashion-mnist", "MLPClassifier (relu, hidden 100-10)", None, 87.0, "accuracy", NONE, FASHION_2017,
             "Table 3",
             note="scikit-learn on raw pixels; mean of 5 runs with shuffled training data"),
)


def baselines_for(dataset: str | None = None) -> list[Baseline]:
    """The rows for ``dataset`` (all rows when None), best accuracy first."""
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"no published baselines for {dataset!r}; known: {', '.join(DATASETS)}")
    rows = [b for b in BASELINES if dataset is None or b.dataset == dataset]
    return sorted(rows, key=lambda b: (DATASETS.index(b.dataset), -b.accuracy))


def citations(rows: Iterable[Baseline]) -> list[Citation]:
    """Distinct citations of ``rows`` in first-use order."""
    return list(dict.fromkeys(b.citation for b in rows))


def _params(b: Baseline) -> str:
    return b.params or "—"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A fixed-width plain-text table; columns whose index is in ``right`` are right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_baselines(dataset: str | None = None) -> str:
    """The literature table as plain text, with a numbered reference list."""
    out = []
    for ds in [dataset] if dataset else list(DATASETS):
        rows = baselines_for(ds)
        refs = citations(rows)
        table = [
            [b.model, _params(b), f"{b.accuracy:.2f}", f"{b.error:.2f}", b.metric, b.augmentation,
             f"[{refs.index(b.citation) + 1}] {b.table}", b.note]
            for b in rows
        ]
        out.append(f"{ds}: published test results (not measured by cifarlens)")
        out.append(text_table(["model", "params", "acc %", "err %", "published", "augmentation", "ref", "note"],
                              table, right=(1, 2, 3)))
        out.append("")
        out.extend(f"  [{i + 1}] {c.full()}" for i, c in enumerate(refs))
        out.append("")
    out.append("'published' says which figure the paper printed; the other is 100 minus it.")
    return "\n".join(out) + "\n"
