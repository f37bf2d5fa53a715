"""Name -> class registries, in the style of torchvision's model registry.

One registry holds the clip feature extractors (``extractors.EXTRACTORS``), another the detectors
(``models.DETECTORS``). ``register(name)`` refuses duplicate names; ``get(name, **cfg)`` builds an
instance; ``list()`` returns the sorted names.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """A registry of classes (or factories) under unique names.

    Args:
        kind: what the registry holds, used in error messages ("extractor", "detector").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering ``cls`` under ``name``; a duplicate name raises RegistryError."""

        def wrap(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered by "
                    f"{self._entries[name].__module__}.{self._entries[name].__qualname__}"
                )
            self._entries[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return wrap

    def get_class(self, name: str) -> type[T]:
        """The class registered under ``name``; an unknown name raises RegistryError listing the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.list()) or "(none)"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def get(self, name: str, **cfg: object) -> T:
        """Build the entry registered under ``name`` with keyword arguments ``cfg``."""
        return self.get_class(name)(**cfg)

    def list(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
