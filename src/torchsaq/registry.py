"""One registry type for every extension point: a name -> entry table whose entries describe themselves.

Quantizers (:data:`torchsaq.quant.QUANTIZERS`), sharpness-aware strategies and perturbation modes
(:mod:`torchsaq.optim`), base optimizers, learning-rate schedules, data sets and models (:mod:`torchsaq.train`),
export formats (:mod:`torchsaq.export`) are each a :class:`Registry`. The command line takes its ``choices`` and
help texts from them, and :class:`torchsaq.TrainConfig` validates against them, so a new entry shows up
everywhere at once. Importing this module imports nothing else of torchsaq.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar, overload

__all__ = ["Entry", "Registry"]

T = TypeVar("T")
_DECORATE: Any = object()  # register() without a value: a decorator


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing: its ``name``, a one-line ``description`` (help texts) and its ``value``."""

    name: str
    value: T
    description: str


class Registry(Generic[T]):
    """Names of one kind of thing (``what``: "quantizer", "strategy", ...), each with a value and a description.

    ``reg.register("name", value, description="...")`` or, as a decorator, ``@reg.register("name",
    description="...")``; ``reg.get(name)`` the value (a ValueError naming the choices, with a suggestion, for an
    unknown name); ``reg.names()`` in registration order; ``reg.help()`` name -> description;
    ``reg.describe()`` ``"a: what a is; b: what b is"`` for a help text.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Entry[T]] = {}

    @overload
    def register(self, name: str, value: T, *, description: str, replace: bool = False) -> T: ...

    @overload
    def register(self, name: str, *, description: str, replace: bool = False) -> Callable[[T], T]: ...

    def register(self, name: str, value: Any = _DECORATE, *, description: str, replace: bool = False) -> Any:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")

        def add(v: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.what} {name!r} is already registered (replace=True to replace it)")
            self._entries[name] = Entry(name, v, description)
            return v

        return add if value is _DECORATE else add(value)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def copy(self) -> "Registry[T]":
        """A new registry with the same entries (registering in one does not change the other)."""
        out: Registry[T] = Registry(self.what)
        out._entries = dict(self._entries)
        return out

    def __getitem__(self, name: str) -> T:
        return self._entries[name].value

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(self.unknown(name)) from None

    def get(self, name: str) -> T:
        return self.entry(name).value

    def check(self, name: Any) -> str:
        """``name`` if it is registered, else the ValueError of :meth:`unknown`."""
        self.entry(name)
        return name

    def unknown(self, name: Any) -> str:
        """The message for a name that is not registered: the choices, and the closest one."""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.what} {name!r}{hint}; choose one of {', '.join(self._entries)}"

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def help(self) -> dict[str, str]:
        return {n: e.description for n, e in self._entries.items()}

    def describe(self) -> str:
        return "; ".join(f"{n}: {e.description}" for n, e in self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"
