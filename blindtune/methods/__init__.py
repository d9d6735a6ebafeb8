"""Methods, registered by name. Each is a sub-package with its config, client side and server side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blindtune import config as run_config
from blindtune.methods.base import Method

_METHODS: dict[str, Method] = {}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    _import_builtin_methods()
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _METHODS[name]


def config_class(name: str) -> type[Any]:
    """The dataclass of method `name`'s config section."""
    return get_method(name).config_class


def run_config_from_dict(data: dict[str, Any]) -> run_config.RunConfig:
    """A RunConfig from plain data, the method's section typed by its method."""
    return run_config.run_config_from_dict(data, config_class)


def load_run_config(
    path: str | Path, overrides: dict[str, Any] | None = None, settings: Sequence[str] = ()
) -> run_config.RunConfig:
    """A run config YAML file (with `overrides`, then `--set` style `settings`, merged in), the method's
    section typed by its method."""
    return run_config.load_run_config(path, config_class, overrides, settings)


def method_names() -> list[str]:
    _import_builtin_methods()
    return sorted(_METHODS)


def _import_builtin_methods() -> None:
    from blindtune.methods import fedcot, fedmkt, fedproxy, lleot, offsite  # noqa: F401
