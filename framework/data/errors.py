"""Errors for bad input data: each names the file, line or field at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Invalid input data. The message names the source (file, line, field) at fault."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = []
        if source:
            where.append(str(source) + (f":{line}" if line is not None else ""))
        if field:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.source, self.line, self.field = source, line, field
        self.reason = message  # the message without its location prefix


class ConfigError(ValueError):
    """A setting that cannot work (e.g. ``model.init_from`` naming a checkpoint whose backbone
    does not fit): the message names the key and what is wrong. The CLI reports it, like a
    :class:`DataError`, in one line with exit status 2."""
