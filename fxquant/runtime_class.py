"""Subclasses made at run time and swapped in as a module's class: the module keeps its state, its forward changes.

One subclass per (kind, class), so identical modules still share one class and Dynamo traces them alike (a per-module
forward wrapper makes it guard on each wrapper and recompile every block). Pickle finds no run-time class by name,
so an instance pickles as "the `kind` subclass of its base class" and is rebuilt from that.
"""

from __future__ import annotations

from typing import Callable

_MEMBERS: dict[str, Callable[[type], dict]] = {}  # kind -> base class -> the subclass's members
_MADE: dict[tuple[str, type], type] = {}


def register(kind: str, members: Callable[[type], dict]) -> None:
    """Declare a kind of run-time subclass: members(base class) -> the attributes the subclass defines."""
    _MEMBERS[kind] = members


def subclass(kind: str, cls: type) -> type:
    """The `kind` subclass of cls (named Fxquant<Kind><cls name>), made once."""
    if (kind, cls) not in _MADE:
        def __reduce_ex__(self, protocol):
            return _instance, (kind, cls), self.__dict__

        name = f"Fxquant{kind.title()}{cls.__name__}"
        _MADE[kind, cls] = type(name, (cls,), {**_MEMBERS[kind](cls), "__reduce_ex__": __reduce_ex__,
                                               "fxquant_base_class": cls, "fxquant_kind": kind,
                                               "__module__": __name__})
    return _MADE[kind, cls]


def base_class(obj: object, kind: str) -> type:
    """The class obj had before its `kind` subclass was swapped in (its own class if it was not)."""
    cls = type(obj)
    return cls.fxquant_base_class if getattr(cls, "fxquant_kind", None) == kind else cls


def _instance(kind: str, cls: type) -> object:
    """An empty instance of cls's `kind` subclass (unpickling sets its state)."""
    return object.__new__(subclass(kind, cls))
