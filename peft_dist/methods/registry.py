"""Method registry, timm style: ``@register_method("lora", LoraOptions)`` on a :class:`Method` subclass.

The options dataclass is the schema of the YAML ``method:`` section (minus ``name``); an optional ``validate()``
on it checks ranges. Method modules are imported lazily by :func:`_load_builtin` so the registry is complete
before any lookup.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from peft_dist.config import ConfigError, build_dataclass

_REGISTRY: dict[str, type] = {}
_BUILTIN_MODULES = ("peft_dist.methods.baselines", "peft_dist.methods.lora", "peft_dist.methods.adapter")
_OPTIONAL_MODULES = (  # methods that land in their own modules; absent ones are simply not registered
    "peft_dist.methods.snell", "peft_dist.methods.snella", "peft_dist.methods.spt", "peft_dist.methods.arc",
    "peft_dist.methods.hta", "peft_dist.methods.sparse_masked",
)
_loaded = False


def register_method(name: str, options_cls: type) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        cls.options_cls = options_cls
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    for mod in _OPTIONAL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def resolve_options(name: str, options: dict[str, Any] | None) -> Any:
    """Build and validate the method's options dataclass from the ``method:`` section (``method.<key>`` errors)."""
    cls = method_class(name).options_cls
    opts = build_dataclass(cls, dict(options or {}), prefix="method")
    if hasattr(opts, "validate"):
        opts.validate()
    return opts


def build_method(name: str, **options: Any):
    return method_class(name)(resolve_options(name, options))


def apply_method(model: nn.Module, name: str, **options: Any):
    """Inject method ``name`` into ``model`` in place (freezing everything else) and return the Method."""
    method = build_method(name, **options)
    method.apply(model)
    return method
