"""Errors every layer raises. Imports nothing from byztrain, so config, registries and plugins can all use it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value. The message names the field and what would be accepted."""

    def __init__(self, field_path: str, message: str):
        self.field = field_path
        super().__init__(f"config field '{field_path}': {message}")
