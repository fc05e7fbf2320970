"""The flags that build a run config (``train``, ``bench``, ``tune``): their parsing, their
checks, and the config they describe (recipe defaults < --config FILE < flags < --set)."""

from __future__ import annotations

import argparse

from cifarlens.errors import CifarlensError


def add_config_flags(p) -> None:
    """The flags that build a RunConfig (train and bench)."""
    from cifarlens.data import list_datasets
    from cifarlens.models import list_models
    from cifarlens.recipes import list_recipes

    p.add_argument("--config", metavar="FILE.yaml", help="YAML with sections data/model/train/track")
    p.add_argument("--dataset", type=one_of("dataset", list_datasets()), metavar=braced(list_datasets()),
                   help="default cifar10")
    p.add_argument("--data-dir", help="folder holding (or receiving) the dataset (default ./data)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the data is not there")
    p.add_argument("--model", type=one_of("model", list_models()), metavar=braced(list_models()),
                   help="default: fastnet_cpu on a CPU, fastnet on a GPU (cifarlens list: each model's recipe)")
    # default None, not False: a --config file's model.pretrained is then not overridden
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="start from torchvision's ImageNet weights (downloaded; resnet18, resnet50, efficientnet_b0)")
    p.add_argument("--weights", metavar="FILE",
                   help="start from a weights file: safetensors or a PyTorch state dict (works offline)")
    p.add_argument("--recipe", type=one_of("recipe", list_recipes()), metavar=braced(list_recipes()),
                   help="default: the model's own (cifarlens list shows them and their settings)")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="train as many epochs of the recipe as fit in this time on this machine, e.g. 10m, 600, "
                        "1.5h (steps are timed first; sets train.time_budget in seconds; not with --epochs)")
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--augment", type=_augment_spec, metavar="LEVEL[+POLICY...]",
                   help=f"a level ({', '.join(augment_levels())}) and/or policies added to it "
                        f"({', '.join(policy_names())}), e.g. standard+cutout+autoaugment; sets data.augment "
                        "and data.policies (no policy named: none)")
    p.add_argument("--seed", type=int, help="default 0 (data split, initialisation, augmentation)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any config value, e.g. --set train.weight_decay=1e-4, or one model option, "
                        "--set model.kwargs.widths=[32,64,128] (repeatable)")


def one_of(kind: str, names: list[str]):
    """An argparse type: one of ``names``, else argparse's one-line error with the closest names."""
    def check(text: str) -> str:
        from cifarlens.registry import unknown_name

        if text not in names:
            raise argparse.ArgumentTypeError(unknown_name(kind, text, names))
        return text

    check.__name__ = kind  # argparse names the type in some messages
    return check


def braced(names: list[str]) -> str:
    return "{" + ",".join(names) + "}"


def loggers():
    from cifarlens.tracking import list_trackers

    return list_trackers()


def augment_levels():
    from cifarlens.data.augment import AUGMENT_LEVELS

    return list(AUGMENT_LEVELS)


def policy_names():
    from cifarlens.data.policies import list_policies

    return list_policies()


def _augment_spec(text: str) -> tuple[str | None, list[str]]:
    """``--augment standard+cutout+autoaugment`` -> ("standard", ["cutout", "autoaugment"]);
    without a level, None: the level stays what it was (a --config file's, else the dataset's default)."""
    level, policies = None, []
    if not text.strip("+ "):  # --augment "" or "$AUG" unset: said, not taken as "no policy"
        raise argparse.ArgumentTypeError(f"no level or policy named in {text!r}; give e.g. standard or "
                                          "standard+cutout (leave the flag out for the defaults)")
    for part in filter(None, (p.strip() for p in text.split("+"))):
        if part in augment_levels() and level is None:
            level = part
        elif part in policy_names() and part not in policies:
            policies.append(part)
        elif part in policies:
            raise argparse.ArgumentTypeError(f"{part!r} is named twice")
        elif part in augment_levels():
            raise argparse.ArgumentTypeError(f"two levels, {level!r} and {part!r}: give one level "
                                             f"({', '.join(augment_levels())}), then policies")
        else:
            from cifarlens.registry import did_you_mean

            hint = did_you_mean(part, augment_levels() + policy_names())
            raise argparse.ArgumentTypeError(
                f"{part!r} is not an augmentation level ({', '.join(augment_levels())}) or policy "
                f"({', '.join(policy_names())}){hint}")
    return level, policies


# flag -> (section, key) of the config
FLAG_KEYS = {
    "dataset": ("data", "dataset"), "data_dir": ("data", "data_dir"), "augment": ("data", "augment"),
    "model": ("model", "name"), "recipe": ("train", "recipe"), "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"), "lr": ("train", "lr"), "seed": ("train", "seed"),
    "device": ("train", "device"), "pretrained": ("model", "pretrained"), "weights": ("model", "weights"),
    "logger": ("track", "loggers"), "tracking_uri": ("track", "tracking_uri"),  # train only
}


def config_from_args(args, *, resolve: bool = True):
    """The run config the flags describe; with ``resolve``, a model and recipe left unset are
    chosen for the device (see :func:`cifarlens.recipes.resolve_choices`)."""
    from cifarlens.config import RunConfig, load_yaml, merge, parse_assignment

    cfg = RunConfig()
    if args.config:
        values = load_yaml(args.config)
        try:
            cfg = merge(cfg, values)
        except CifarlensError as err:  # which file holds the wrong key or value: --set gives others
            raise CifarlensError(f"{args.config}: {err}") from None
        if getattr(args, "recipe", None) and isinstance(values.get("train"), dict):
            _warn_file_beats_recipe(args.config, args.recipe, values["train"])
    overrides: dict = {}
    for flag, (section, key) in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if flag == "logger" and value is not None:  # --logger a --logger b,c -> [a, b, c]
            value = [name.strip() for part in value for name in part.split(",") if name.strip()]
            if not value:  # --logger , or --logger "$LOGGERS" unset: nothing would be logged, silently
                raise CifarlensError(f"--logger names no logger; give {' or '.join(loggers())}, or leave it out")
        if flag == "augment" and value is not None:  # LEVEL+POLICY+...: the policies, and the level if named
            value, policies = value
            overrides.setdefault("data", {})["policies"] = policies
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.no_download:
        overrides.setdefault("data", {})["download"] = False
    if getattr(args, "time_budget", None) is not None:
        from cifarlens.budget import parse_duration

        if args.epochs is not None:
            raise CifarlensError("--time-budget chooses the number of epochs: drop --epochs (or --time-budget)")
        seconds = parse_duration(args.time_budget)
        if seconds <= 0:
            raise CifarlensError(f"--time-budget must be longer than 0 seconds, got {args.time_budget!r}")
        overrides.setdefault("train", {})["time_budget"] = seconds
    cfg = merge(cfg, overrides)
    for assignment in args.set:
        cfg = merge(cfg, parse_assignment(assignment, cfg))
    if getattr(args, "epochs", None) is not None and cfg.train.time_budget and getattr(args, "time_budget", None) is None:
        raise CifarlensError(f"--epochs {args.epochs} and train.time_budget {cfg.train.time_budget:g} s (from --config or "
                             "--set) both set the training's length: drop --epochs, or --set train.time_budget=0")
    return resolve_choices_for(cfg)[0] if resolve else cfg


def _warn_file_beats_recipe(path, recipe: str, train: dict) -> None:
    """--recipe NAME beside a config file of another recipe that sets NAME's settings otherwise (a
    run's saved config.yaml sets them all): the file's win, by the precedence, so the run trained
    the file's recipe under the new name, without a word."""
    import warnings

    from cifarlens.recipes import RECIPES

    if recipe not in RECIPES or train.get("recipe") in (None, recipe):  # unknown: refused later, with the names
        return
    defaults = RECIPES.get(recipe)
    differ = sorted(f"train.{key}" for key, value in train.items()
                    if key in defaults and key != "recipe" and value is not None and value != defaults[key])
    if differ:
        warnings.warn(f"--recipe {recipe}: {path} sets {len(differ)} of its settings otherwise "
                      f"({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}), and the file's win (recipe < "
                      "--config < flags < --set); delete them from the file to train the recipe as it is",
                      stacklevel=2)


def resolve_choices_for(cfg):
    """``resolve_choices`` on the device ``cfg.train.device`` names."""
    from cifarlens.device import resolve_device
    from cifarlens.recipes import resolve_choices

    return resolve_choices(cfg, resolve_device(cfg.train.device).type)
