"""Named registries: anything a config or recipe names by a string comes from one of these."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from slimkit.core.errors import SlimkitError


class Registry:
    """A mapping from a public name to an object, with a clear error for unknown names.

    Example:
        >>> METHODS = Registry("method")
        >>> @METHODS.register("rtn", help="round to nearest")
        ... class RTN: ...
        >>> METHODS.get("rtn").__name__
        'RTN'
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: Any = None, **meta: Any) -> Any:
        """Register ``obj`` under ``name``; used bare it returns a decorator."""

        def add(o: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            self._meta[name] = meta
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise SlimkitError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self._items[n]) for n in self.names()]

    def where(self, label: str, /, **match: Any) -> Registry:
        """A live view of the entries whose metadata has ``match`` (e.g. ``kind="pruning"``),
        called ``label`` in its messages; registering through the view adds to this registry
        with ``match`` in the metadata."""
        return _RegistryView(self, label, match)


class _RegistryView(Registry):
    def __init__(self, parent: Registry, label: str, match: dict[str, Any]):
        self.kind, self._parent, self._match = label, parent, match

    @property
    def _items(self) -> dict[str, Any]:  # type: ignore[override]
        p = self._parent
        return {
            n: o
            for n, o in p._items.items()
            if all(p._meta[n].get(k) == v for k, v in self._match.items())
        }

    @property
    def _meta(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        return {n: self._parent._meta[n] for n in self._items}

    def register(self, name: str, obj: Any = None, **meta: Any) -> Any:
        return self._parent.register(name, obj, **meta, **self._match)
