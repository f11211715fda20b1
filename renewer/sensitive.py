"""A value that must never be printed: tokens, private keys, TSIG secrets."""

from __future__ import annotations

from typing import Final

_REDACTED: Final = "<redacted>"


class Secret:
    """Holds a secret string. ``str``/``repr``/format show ``<redacted>``; ``reveal()``
    is called only where the value leaves the process (an HTTP header, a file, a child's
    environment)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_REDACTED})"

    def __str__(self) -> str:
        return _REDACTED

    def __format__(self, spec: str) -> str:
        return _REDACTED

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy the value somewhere we do not control.
        raise TypeError("Secret values cannot be pickled")
