"""cifarlens: train, evaluate, explain and serve CNN image classifiers on CIFAR-10/100 and friends.

The public API is imported lazily, so ``import cifarlens.metrics`` stays light.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "train": "cifarlens.api", "evaluate_run": "cifarlens.api", "load_run": "cifarlens.api",
    "Run": "cifarlens.api", "Prediction": "cifarlens.api",
    "create_model": "cifarlens.models", "list_models": "cifarlens.models",
    "CifarlensError": "cifarlens.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cifarlens' has no attribute {name!r}")
