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
    import importlib
    import importlib.util

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # cifarlens.export.load_exported(...) after import cifarlens
    raise AttributeError(f"module 'cifarlens' has no attribute {name!r}")


def __dir__():  # what a notebook's tab completion offers: the API and the modules
    import pkgutil

    return sorted({*globals(), *_EXPORTS, *(m.name for m in pkgutil.iter_modules(__path__))})
