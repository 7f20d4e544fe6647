"""Name -> class registries (methods, task families): a class registers itself with a decorator,
and an unknown name is a ConfigError that lists the valid ones."""
from __future__ import annotations

from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    def __init__(self, what: str, attribute: str):
        super().__init__()
        self.what, self.attribute = what, attribute   # e.g. "method", and the class attribute "name"

    def register(self, name: str):
        """Class decorator: registers the class under `name` and sets its attribute to it."""
        def deco(cls: type[T]) -> type[T]:
            if name in self:
                raise RuntimeError(f"{self.what} {name!r} registered twice")
            setattr(cls, self.attribute, name)
            self[name] = cls
            return cls
        return deco

    def lookup(self, name: str) -> type[T]:
        if name not in self:
            raise ConfigError(f"unknown {self.what} {name!r}; valid: {sorted(self)}")
        return self[name]
