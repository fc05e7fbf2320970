"""What a study reports: the best trial, trials.csv, the table in the log, and Optuna's plots."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cifarlens.io import TEXT, atomic_write
from cifarlens.plots import DPI  # (imported before pyplot: it selects Agg)
from cifarlens.tune.space import SearchSpace


def best_trial(trials) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def format_values(values: dict[str, Any]) -> str:
    return " ".join(f"{key.split('.')[-1]}={_format_value(v)}" for key, v in values.items())


TRIAL_COLUMNS = ("number", "state", "value", "val_loss", "best_epoch", "epochs", "train_seconds", "duration_s",
                 "datetime_start", "run_dir", "note")


def write_trials_csv(trials, space: SearchSpace, path: Path) -> None:
    names = [p.name for p in space.params]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", **TEXT) as f:
            writer = csv.writer(f)
            writer.writerow([*TRIAL_COLUMNS, *names])
            for t in trials:
                a = t.user_attrs
                duration = t.duration.total_seconds() if t.duration is not None else None
                note = a.get("error") or a.get("pruned_reason") or ""
                writer.writerow([t.number, t.state.name, t.value, a.get("val_loss"), a.get("best_epoch"),
                                 a.get("epochs"), a.get("train_seconds"),
                                 None if duration is None else round(duration, 3),
                                 t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                                 a.get("run_dir"), note, *[t.params.get(n) for n in names]])

    atomic_write(path, write)


def format_table(trials, space: SearchSpace) -> str:
    lines = [f"{'trial':>5}  {'state':<8}  {'val_acc':>7}  {'epochs':>6}  {'seconds':>7}  params"]
    for t in trials:
        value = f"{t.value:.2%}" if t.value is not None and t.state == TrialState.COMPLETE else "-"
        epochs = t.user_attrs.get("epochs", "-")
        seconds = t.user_attrs.get("train_seconds")
        lines.append(f"{t.number:>5}  {t.state.name:<8}  {value:>7}  {epochs!s:>6}  "
                     f"{'-' if seconds is None else f'{seconds:.1f}':>7}  "
                     f"{format_values(space.values_of(t.params))}")
    return "\n".join(lines)


def write_plots(study: optuna.Study, out: Path, log: Callable[[str], None]) -> dict:
    """history.png and importances.png with Optuna's matplotlib visualisation; a plot that the
    trials cannot support yet is skipped with a note."""
    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import (
        plot_optimization_history,
        plot_param_importances,
    )

    files = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [p for p in {k for t in complete for k in t.params}
              if len({json.dumps(t.params.get(p)) for t in complete}) > 1]
    plots = [("history", plot_optimization_history, len(complete) >= 1, "no completed trial yet"),
             ("importances", plot_param_importances, len(complete) >= 2 and bool(varied),
              "needs at least 2 completed trials whose parameters differ")]
    for name, plot, possible, why in plots:
        path = out / f"{name}.png"
        if not possible:
            log(f"note: {path.name} skipped: {why}")
            continue
        # Optuna's plots switch pyplot's style: keep that change inside this block
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # "few trials in some regimes": a small study
            try:
                ax = plot(study, target_name="val_acc")
            except (ValueError, RuntimeError) as err:
                log(f"note: {path.name} skipped: {err}")
                continue
            fig = ax.figure
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
            plt.close(fig)
        files[name] = str(path)
    return files
