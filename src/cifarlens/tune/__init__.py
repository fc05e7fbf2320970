"""Hyperparameter search with Optuna: TPE sampling, pruning on per-epoch validation accuracy,
studies shared by several worker processes through one storage.

The library API (the CLI, ``cifarlens tune``, calls the same functions)::

    from cifarlens.tune import default_space, load_space, run_tune

    summary = run_tune(base_cfg, "runs/tune-x", trials=30, space=load_space("configs/tune/space.yaml"))

Trials are judged on the validation split only: every trial trains through
:func:`cifarlens.api.train` with ``evaluate_test=False`` on data whose test split has been
dropped, so the search can never look at test images.
"""

from cifarlens.tune.space import SearchSpace, default_space, load_space, parse_space

_SEARCH = ("Tuner", "open_storage", "open_study", "run_tune")


def __getattr__(name: str):
    # the search half imports Optuna (~0.5 s): only when it is used, not for `cifarlens --help`
    if name in _SEARCH:
        from cifarlens.tune import search

        return getattr(search, name)
    raise AttributeError(f"module 'cifarlens.tune' has no attribute {name!r}")


__all__ = ["SearchSpace", "Tuner", "default_space", "load_space", "open_storage", "open_study", "parse_space", "run_tune"]
