"""Search spaces: which config keys a study samples, and from what.

A space is data, a YAML mapping from dotted config keys to value forms::

    train.optimizer: {choices: [sgd, adam]}
    train.lr:                                   # one alternative per condition
      - {float: [0.01, 0.5], log: true, when: {train.optimizer: sgd}}
      - {float: [1.0e-4, 3.0e-3], log: true, when: {train.optimizer: adam}}
    train.batch_size: {choices: [128, 256, 512]}
    model.kwargs.widths: {choices: [[16, 32, 64], [32, 64, 128]]}
    model.kwargs.depths: {int: [1, 3]}          # hypothetical: LensNet wants a list here

Forms: ``{float: [LOW, HIGH]}`` (optional ``log: true`` or ``step: S``), ``{int: [LOW, HIGH]}``
(same options), ``{choices: [A, B, ...]}`` (any YAML values, lists included). ``when:
{KEY: VALUE or [VALUES]}`` samples the entry only when the earlier-defined ``KEY`` was
sampled to one of those values (Optuna's define-by-run); a key may have a list of such
alternatives, and the first whose condition holds is used. Keys are ``section.field`` of
:class:`cifarlens.config.RunConfig` or ``model.kwargs.OPTION``. Everything is checked when
the file is loaded (:func:`load_space`) and against the base config (:meth:`SearchSpace.check`),
so a bad space fails before a study starts, never in the middle of one.
"""

from __future__ import annotations

import inspect
import json
import math
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cifarlens.config import ModelConfig, RunConfig, dump_yaml, load_yaml, merge
from cifarlens.errors import CifarlensError

# Config keys that may differ between workers of one study (so never tuned): where the data sits
# on each machine, which device and how many loader workers it uses, and whether its CPU trains in
# bf16; and where it logs (tracking records the trials, never changes them).
MACHINE_KEYS = ("data.data_dir", "data.download", "data.workers", "train.device", "train.cpu_amp",
                "track.loggers", "track.tracking_uri", "track.experiment")

FORMS = ("float", "int", "choices")
OPTIONS = ("log", "step", "when")
# Optuna's categorical distribution holds only these; other choices travel as JSON strings
_PRIMITIVE = (type(None), bool, int, float, str)

# The model-independent part of the default space. Ranges: SGD peak lr around the recipes'
# 0.1-0.2 per 128-512 images (fast_cpu's 0.8 per 256 is 0.4 per 128: inside), Adam(W) around its
# usual 1e-3; AdamW's decoupled decay is multiplied by lr, so it needs larger values than SGD's L2
# decay. The recipe choice sets what the space leaves alone (fast_cpu differs from fast only in
# epochs, batch size and lr, which the space or the base config set, so it is not a choice).
DEFAULT_TRAIN_SPACE: dict[str, Any] = {
    "train.recipe": {"choices": ["fast", "modern", "reference"]},
    "train.optimizer": {"choices": ["sgd", "adam"]},
    "train.lr": [
        {"float": [0.01, 0.5], "log": True, "when": {"train.optimizer": "sgd"}},
        {"float": [1.0e-4, 3.0e-3], "log": True, "when": {"train.optimizer": "adam"}},
    ],
    "train.weight_decay": [
        {"float": [1.0e-5, 1.0e-3], "log": True, "when": {"train.optimizer": "sgd"}},
        {"float": [1.0e-4, 0.1], "log": True, "when": {"train.optimizer": "adam"}},
    ],
    "train.label_smoothing": {"float": [0.0, 0.2]},
    "train.batch_size": {"choices": [128, 256, 512]},
    "data.augment": {"choices": ["none", "flip", "standard", "strong"]},
}
# model options the default space tunes when the model's factory accepts them
DEFAULT_MODEL_OPTIONS = ("dropout", "widths", "depths")


@dataclass(frozen=True)
class Param:
    """One entry of a space: the config ``key`` it sets and the Optuna parameter ``name``."""

    key: str  # dotted config key, e.g. "train.lr"
    name: str  # Optuna parameter name: the key, plus "[COND]" for a conditional alternative
    form: str  # "float" | "int" | "choices"
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()  # ((key, allowed values), ...)

    @property
    def encoded(self) -> bool:
        """Whether the choices go to Optuna as JSON strings (lists, mappings)."""
        return any(not isinstance(c, _PRIMITIVE) for c in self.choices)

    def suggest(self, trial) -> Any:
        if self.form == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.form == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        if self.encoded:
            return json.loads(trial.suggest_categorical(self.name, [json.dumps(c) for c in self.choices]))
        return trial.suggest_categorical(self.name, list(self.choices))

    def decode(self, value: Any) -> Any:
        """The config value of an Optuna parameter value (as stored in a trial's params)."""
        return json.loads(value) if self.form == "choices" and self.encoded else value

    def active(self, values: dict[str, Any]) -> bool:
        return all(k in values and values[k] in allowed for k, allowed in self.when)

    def representatives(self) -> list[Any]:
        """Values that exercise the whole range when checked against a config."""
        return list(self.choices) if self.form == "choices" else [self.low, self.high]

    def spec(self) -> dict:
        """This entry in the file's form."""
        out: dict[str, Any] = {self.form: list(self.choices) if self.form == "choices" else [self.low, self.high]}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        if self.when:
            out["when"] = {k: (list(v) if len(v) > 1 else v[0]) for k, v in self.when}
        return out


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str = "<space>"  # file name or description, for error messages

    def config_keys(self) -> list[str]:
        return list(dict.fromkeys(p.key for p in self.params))

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def sample(self, trial) -> dict[str, Any]:
        """Ask ``trial`` for a value of every entry whose condition holds: {config key: value}."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.key not in values and p.active(values):
                values[p.key] = p.suggest(trial)
        return values

    def values_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """{config key: value} of a finished trial's ``params`` (Optuna names, encoded values)."""
        return {p.key: p.decode(params[p.name]) for p in self.params if p.name in params}

    def to_dict(self) -> dict:
        """The file form (``load_space`` of its YAML gives this space back)."""
        out: dict[str, Any] = {}
        for p in self.params:
            if p.when or len([q for q in self.params if q.key == p.key]) > 1:
                out.setdefault(p.key, []).append(p.spec())
            else:
                out[p.key] = p.spec()
        return out

    def to_yaml(self, header: str = "") -> str:
        lines = [f"# {line}".rstrip() for line in header.splitlines()]
        body = [f"{key}: {_flow(spec)}" if not isinstance(spec, list) else
                f"{key}:\n" + "".join(f"  - {_flow(alt)}\n" for alt in spec).rstrip("\n")
                for key, spec in self.to_dict().items()]
        return "\n".join(lines + body) + "\n"

    def apply(self, base: RunConfig, values: dict[str, Any]) -> RunConfig:
        """``base`` overlaid with sampled ``values`` (through :func:`cifarlens.config.merge`)."""
        return apply_values(base, values)

    def check(self, base: RunConfig) -> None:
        """Check every entry's values against ``base`` (types, recipe checks, model options)."""
        from cifarlens.data.policies import check_settings
        from cifarlens.models import MODELS
        from cifarlens.recipes import resolve_train

        names = next((p.choices for p in self.params if p.key == "model.name"), ())
        _build_model(base.model)  # the base config's model.kwargs, as train would refuse them
        for p in self.params:
            for value in p.representatives():
                try:
                    cfg = apply_values(base, {p.key: value})
                    resolve_train(cfg.train)
                    if cfg.train.time_budget or p.key in MACHINE_KEYS:
                        raise CifarlensError("not a setting to tune: " + ("trials are compared after the same "
                                             "epochs" if cfg.train.time_budget else "it describes this machine"))
                    option = p.key.split(".", 2)[2] if p.key.startswith("model.kwargs.") else None
                    for model in dict(p.when).get("model.name", names or (base.model.name,)) if option else ():
                        if option in model_options(model):  # the values the model refuses (widths [0, 0, 0])
                            _build_model(replace(cfg.model, name=model))
                    check_settings(cfg.data)  # the augmentation level, policies, flip, loader
                    MODELS.get(cfg.model.name)
                    _check_dataset(cfg.data.dataset)
                    if cfg.data.val_fraction == 0:
                        raise CifarlensError("tuning scores trials on the validation split, so data.val_fraction "
                                             "must stay above 0")
                except CifarlensError as err:
                    raise CifarlensError(f"search space {self.source}: {p.key} = {value!r}: {err}") from None
            if p.key.startswith("model.kwargs."):
                option = p.key.split(".", 2)[2]
                allowed = dict(p.when).get("model.name", names or (base.model.name,))
                for model in allowed:
                    if option not in model_options(model):
                        raise CifarlensError(
                            f"search space {self.source}: {p.key}: model {model!r} has no option {option!r} "
                            f"(its options: {', '.join(model_options(model)) or 'none'}); drop the entry or "
                            "add when: {model.name: ...}")


def _flow(value: Any) -> str:
    return dump_yaml(value, default_flow_style=True, sort_keys=False, width=1000).strip()


def _build_model(model: ModelConfig) -> None:
    from cifarlens.models import create_model

    create_model(model.name, 10, 3, **model.kwargs)


def _check_dataset(name: str) -> None:
    import cifarlens.data  # noqa: F401  (registers the readers)
    from cifarlens.data.base import DATASETS

    DATASETS.get(name)


def model_options(name: str) -> list[str]:
    """The ``model.kwargs`` options a registered model's factory accepts."""
    from cifarlens.models import MODELS
    from cifarlens.models.registry import _ALWAYS

    params = inspect.signature(MODELS.get(name)).parameters
    return [k for k, p in params.items() if k not in _ALWAYS and p.kind is not inspect.Parameter.VAR_KEYWORD]


def _model_default(cfg: RunConfig, option: str) -> Any:
    from cifarlens.models import MODELS

    if option in cfg.model.kwargs:
        return cfg.model.kwargs[option]
    return inspect.signature(MODELS.get(cfg.model.name)).parameters[option].default


def apply_values(base: RunConfig, values: dict[str, Any]) -> RunConfig:
    nested: dict[str, dict] = {}
    kwargs = dict(values.get("model.kwargs", base.model.kwargs))
    for key, value in values.items():
        if key.startswith("model.kwargs."):
            kwargs[key.split(".", 2)[2]] = value
        elif key != "model.kwargs":
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
    if kwargs != base.model.kwargs:
        nested.setdefault("model", {})["kwargs"] = kwargs
    return merge(base, nested)


def _config_keys() -> set[str]:
    """Every dotted ``section.field`` config key."""
    return {f"{section}.{name}" for section, cls in typing.get_type_hints(RunConfig).items()
            for name in typing.get_type_hints(cls)}


def _number(value: Any, integer: bool, where: str) -> int | float:
    if isinstance(value, bool):
        raise CifarlensError(f"{where}: {value!r} is not a number")
    if integer:
        if isinstance(value, int):
            return value
        raise CifarlensError(f"{where}: {value!r} is not an integer")
    number = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):  # .inf and .nan: Optuna cannot sample them
        raise CifarlensError(f"{where}: {value!r} is not a finite number")
    return number


def parse_space(data: Any, source: str = "<space>") -> SearchSpace:
    """Build and fully validate a space from its file form (a mapping)."""
    if not isinstance(data, dict) or not data:
        raise CifarlensError(f"search space {source} must be a non-empty mapping of config keys to value forms, "
                             "e.g. 'train.lr: {float: [0.01, 0.5], log: true}'")
    known = _config_keys()
    params: list[Param] = []
    for key, entry in data.items():
        where = f"search space {source}: {key}"
        if not isinstance(key, str):
            raise CifarlensError(f"{where}: keys must be dotted config keys like train.lr")
        parts = key.split(".")
        if not (key in known or (len(parts) == 3 and parts[:2] == ["model", "kwargs"] and parts[2])):
            raise CifarlensError(f"{where}: not a config key; use SECTION.FIELD (e.g. train.lr, data.augment) "
                                 "or model.kwargs.OPTION")
        if any(p.key == key for p in params):
            raise CifarlensError(f"{where}: defined twice")
        alternatives = entry if isinstance(entry, list) else [entry]
        if not alternatives:
            raise CifarlensError(f"{where}: an empty list of alternatives")
        if len(alternatives) > 1 and not all(isinstance(a, dict) and "when" in a for a in alternatives):
            raise CifarlensError(f"{where}: with several alternatives, each needs a when: condition")
        for alt in alternatives:
            params.append(_parse_entry(key, alt, params, where))
    names = [p.name for p in params]
    for name in names:
        if names.count(name) > 1:
            raise CifarlensError(f"search space {source}: {name}: two alternatives with the same condition")
    return SearchSpace(tuple(params), source)


def _parse_entry(key: str, spec: Any, earlier: list[Param], where: str) -> Param:
    if not isinstance(spec, dict):
        raise CifarlensError(f"{where}: expected a mapping like {{float: [LOW, HIGH]}}, {{int: [LOW, HIGH]}} "
                             f"or {{choices: [...]}}, got {spec!r}")
    forms = [f for f in FORMS if f in spec]
    unknown = sorted(set(spec) - set(FORMS) - set(OPTIONS), key=str)
    if unknown:
        raise CifarlensError(f"{where}: unknown option {unknown[0]!r}; a value form is one of "
                             f"{', '.join(FORMS)}, with options {', '.join(OPTIONS)}")
    if len(forms) != 1:
        raise CifarlensError(f"{where}: give exactly one of {', '.join(FORMS)}")
    form, log, step = forms[0], spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise CifarlensError(f"{where}: log must be true or false")
    when = _parse_when(spec.get("when"), earlier, where)
    name = key if not when else f"{key}[{','.join(f'{k}={_short(v)}' for k, v in when)}]"
    if form == "choices":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise CifarlensError(f"{where}: choices must be a non-empty list")
        if log or step is not None:
            raise CifarlensError(f"{where}: log and step apply to float and int ranges, not choices")
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise CifarlensError(f"{where}: choices repeat a value")
        return Param(key, name, form, choices=tuple(choices), when=when)
    bounds = spec[form]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise CifarlensError(f"{where}: {form} needs [LOW, HIGH], got {bounds!r}")
    low, high = (_number(b, form == "int", f"{where}: {form} bound") for b in bounds)
    if low >= high:
        raise CifarlensError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise CifarlensError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None:
        step = _number(step, form == "int", f"{where}: step")
        if step <= 0:
            raise CifarlensError(f"{where}: step must be > 0")
        if log:
            raise CifarlensError(f"{where}: log and step cannot be combined")
    return Param(key, name, form, low=low, high=high, log=log, step=step, when=when)


def _short(values: tuple) -> str:
    return "|".join(str(v) for v in values)


def _parse_when(when: Any, earlier: list[Param], where: str) -> tuple[tuple[str, tuple], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise CifarlensError(f"{where}: when must be a mapping like {{train.optimizer: adam}}")
    out = []
    for key, allowed in when.items():
        defined = [p for p in earlier if p.key == key]
        if not defined:
            raise CifarlensError(f"{where}: when refers to {key!r}, which is not defined earlier in the space")
        if any(p.form != "choices" for p in defined):
            raise CifarlensError(f"{where}: when refers to {key!r}, which is a range; conditions need choices")
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        possible = [c for p in defined for c in p.choices]
        never = [v for v in allowed if v not in possible]
        if never:
            raise CifarlensError(f"{where}: when {key} = {never[0]!r} can never hold; {key} is one of {possible}")
        out.append((key, allowed))
    return tuple(out)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file (see the module docstring for the format)."""
    return parse_space(load_yaml(path, "search space file"), str(path))


def default_space(base: RunConfig) -> SearchSpace:
    """The default space for ``base``'s model: :data:`DEFAULT_TRAIN_SPACE` plus the model options
    (dropout, widths, depths) its factory accepts. Widths are halved/kept/doubled and depths
    -1/kept/+1 around the base config's values (or the factory's defaults), so the stage count
    never changes."""
    data = dict(DEFAULT_TRAIN_SPACE)
    accepted = model_options(base.model.name)
    for option in DEFAULT_MODEL_OPTIONS:
        if option not in accepted:
            continue
        current = _model_default(base, option)
        if option == "dropout":
            data["model.kwargs.dropout"] = {"float": [0.0, 0.3]}
        elif _int_list(current):
            scale = ((lambda w, k: max(1, w * 2**k // 2)) if option == "widths"
                     else (lambda d, k: max(1, d + k - 1)))
            choices = [[scale(v, k) for v in current] for k in range(3)]
            data[f"model.kwargs.{option}"] = {"choices": [c for i, c in enumerate(choices) if c not in choices[:i]]}
    return parse_space(data, f"<default space for {base.model.name}>")


def _int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, int) for v in value)
