"""Errors the library raises for bad configuration values."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad value in a configuration record: ``owner`` and ``field`` name it (so a
    command line can name its flag), ``message`` says what is wrong."""

    def __init__(self, owner: str, field: str, message: str):
        super().__init__(f"{owner}: {field} {message}")
        self.owner, self.field, self.message = owner, field, message
