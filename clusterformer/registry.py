"""Named plug-ins: the one registry class behind tasks, sample specs, model architectures and
backbones (mmengine's ``Registry`` and timm's ``register_model`` are the models).

A :class:`Registry` maps names to entries of one kind. Registering a taken name is refused
(:class:`DuplicateNameError`) unless the call says ``replace=True``, so a plugin that shadows
a built-in does it on purpose and two plugins cannot silently fight over a name. A name it does
not know makes it call its ``load`` function first (for the project's registries
:func:`clusterformer.plugins.load_task_modules`, which imports the modules that register the
built-ins and the user's plugins), so a lookup never depends on what was imported before.

This module imports nothing of the project, so every layer, ``data`` included, may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_MISSING = object()
# The load functions running now: a module that registers on import may look a name up while
# the load that imports it is still running, and must not start that load again.
_LOADING: set[Callable[[], None]] = set()


class DuplicateNameError(ValueError):
    """A name is registered twice without ``replace=True``."""


class Registry(Generic[T]):
    """Entries of one ``kind`` (``"task"``, ``"backbone"``, ...) by name.

    Args:
        kind: what an entry is, for messages (``unknown backbone 'x'; expected one of ...``).
        load: called, without arguments, before a lookup of a name not registered yet and
            before listing; it imports the modules that register entries. It may run again
            (it must skip what it did already); while it runs it is not called again.
    """

    def __init__(self, kind: str, *, load: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._load = load
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | object = _MISSING, *, replace: bool = False):  # noqa: ANN201 - the entry, or a decorator
        """Register ``entry`` under ``name`` and return it; without ``entry``, a decorator that
        registers what it decorates (``@REGISTRY.register("name")``).

        Raises:
            DuplicateNameError: ``name`` is taken and ``replace`` is false.
            ValueError: ``name`` is not a non-empty string.
        """
        if entry is _MISSING:
            self.check_free(name, replace=replace)

            def decorator(obj: T) -> T:
                return self.register(name, obj, replace=replace)

            return decorator
        existing = self._entries.get(name, _MISSING)
        if not (existing is entry or existing == entry):  # the same entry again is no change
            self.check_free(name, replace=replace)
        self._entries[name] = entry  # type: ignore[assignment]
        return entry

    def check_free(self, name: str, *, replace: bool = False) -> None:
        """Refuse a ``name`` that :meth:`register` would refuse (before a caller that registers
        in several registries changes any of them).

        Raises:
            DuplicateNameError: ``name`` is taken and ``replace`` is false.
            ValueError: ``name`` is not a non-empty string.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered; choose another "
                                     "name, or pass replace=True to replace it on purpose")  # fmt: skip

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its entry (ValueError if it is not registered)."""
        if name not in self._entries:
            raise ValueError(f"{self.kind} {name!r} is not registered")
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry of ``name``, loading the registering modules first when it is unknown.

        Raises:
            ValueError: no entry of that name, naming the registered ones.
        """
        if name not in self._entries:
            self.load()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of "
                             f"{', '.join(self._entries) or '(none registered)'}")  # fmt: skip
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name not in self._entries:
            self.load()
        return name in self._entries

    def names(self) -> list[str]:
        """Every registered name, in registration order (built-ins first), after loading."""
        self.load()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, in registration order, after loading."""
        self.load()
        return list(self._entries.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def load(self) -> None:
        """Import the modules that register entries (a no-op without ``load`` or while that
        load is running)."""
        if self._load is None or self._load in _LOADING:
            return
        _LOADING.add(self._load)
        try:
            self._load()
        finally:
            _LOADING.discard(self._load)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
