"""Helpers shared by architecture files: reading HF config keys with clear errors."""

from collections.abc import Mapping


def require(config: Mapping[str, object], *keys: str) -> object:
    """The first of ``keys`` present in an HF ``config.json``; ValueError naming them if none is."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    raise ValueError(f"config.json is missing {' / '.join(repr(k) for k in keys)}")


def optional(config: Mapping[str, object], key: str, default: object) -> object:
    """``config[key]`` when present and not null, else ``default``."""
    value = config.get(key)
    return default if value is None else value
