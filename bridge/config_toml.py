"""Reading a TOML document as typed tables, every problem collected with its dotted path.

The machinery under bridge/config.py (which says what the bridge's configuration is):
a ConfigError names the field (``lu[1].block_size``); an Errors collector lets parsing
go on after one so that ``check-config`` lists every problem at once. Neutral: imports
nothing of the bridge.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(Exception):
    """A configuration problem: ``field`` is the dotted path, ``problem`` says what is wrong."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field = field_path
        self.problem = problem


class ConfigErrors(ConfigError):
    """Several configuration problems; ``errors`` lists them in file order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__(errors[0].field, errors[0].problem)
        self.errors = errors
        self.args = ("\n".join(str(e) for e in errors),)


def parse_size(value: Any, where: str) -> int:
    """An integer byte count or a string such as "1GiB", "512M", "4096"."""
    if isinstance(value, bool):
        raise ConfigError(where, "must be a size such as 1073741824 or \"1GiB\"")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "")[:1].upper()]
    else:
        raise ConfigError(where, f"must be a size such as 1073741824 or \"1GiB\", not {value!r}")
    if size <= 0:
        raise ConfigError(where, "must be greater than zero")
    return size


def format_size(size: int) -> str:
    """Bytes as the largest binary unit that divides them ("64 MiB"), else bytes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


class Errors:
    """Collects ConfigErrors so that one bad field does not hide the next."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    @contextmanager
    def field(self) -> Iterator[None]:
        try:
            yield
        except ConfigErrors as e:
            self.errors.extend(e.errors)
        except ConfigError as e:
            self.errors.append(e)

    def add(self, where: str, problem: str) -> None:
        self.errors.append(ConfigError(where, problem))


class Table:
    """Typed access to one TOML table that remembers its dotted path for errors."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(where, "must be a table")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required or default is ...:
                raise ConfigError(self.path(key), "is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is int or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(self.path(key), f"must be {_ARTICLE.get(names, 'a ' + names)}, not {value!r}")
        return value

    def reject_unknown(self, errors: Errors) -> None:
        for key in self.data:
            if key not in self.used:
                errors.add(self.path(key), "unknown key")


_ARTICLE = {"int": "an integer", "str": "a string", "bool": "true or false", "dict": "a table",
            "list": "an array", "int or str": "an integer or a string"}


def tables(top: Table, key: str, errors: Errors) -> tuple[list[Any], list[Table]]:
    """``[[key]]``: its raw entries, and each entry that is a table (an entry that is not
    is one error, and the rest are still checked)."""
    raw: list[Any] = []
    with errors.field():
        raw = top.get(key, list, [])
    tables = []
    for i, entry in enumerate(raw):
        try:
            tables.append(Table(entry, f"{key}[{i}]"))
        except ConfigError as e:
            errors.errors.append(e)
    return raw, tables
