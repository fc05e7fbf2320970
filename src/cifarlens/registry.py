"""A tiny name -> factory registry, one per kind of thing (models, datasets, recipes).

CLI choices and test parametrisation are derived from registries, never typed twice.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from cifarlens.errors import CifarlensError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # e.g. "model", used in error messages
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register()`` uses the function's ``__name__``."""

        def decorator(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise CifarlensError(unknown_name(self.kind, name, self.names())) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def did_you_mean(name: object, names: list[str], prefix: str = "") -> str:
    """" (did you mean resnet20 or resnet32?)", or "": the names equal to ``name`` but for case and
    separators ("cifar-10" is cifar10), else the closest by spelling; each shown after ``prefix``."""
    import difflib

    def plain(text: str) -> str:
        return "".join(c for c in text.lower() if c.isalnum())

    text = str(name)
    close = [n for n in names if plain(n) == plain(text)] or difflib.get_close_matches(text, names, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + n for n in close)}?)" if close else ""


def unknown_name(kind: str, name: object, names: list[str]) -> str:
    """"unknown model 'resnet2' (did you mean resnet20?); choose one of: ..."."""
    return f"unknown {kind} {name!r}{did_you_mean(name, names)}; choose one of: {', '.join(names)}"
