"""Option values of storage kinds and layers: how text is parsed, and the limits it must meet.

Each parser is a :class:`Values`: the function that turns an option's text into its typed
value (a ``ValueError`` names what is allowed) and the same limits as words, for the docs
(docs/storage.md's tables are generated from these and checked by a unit test).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from backend.volumes.model import InvalidRequestError, parse_size


@dataclasses.dataclass(frozen=True)
class Values:
    """A type of option value: ``parse`` checks and converts, ``limits`` says what it allows,
    ``show`` writes a value (a default) as the docs do."""

    parse: Callable[[str], Any]
    limits: str = ""
    show: Callable[[Any], str] = lambda value: f"`{value}`"


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a storage kind or layer.

    ``default``: the value used when it is not given (``None``: none, or one the factory
    knows, which ``shown_default`` then names for the docs).  Specs record only the options
    given, so changing a default here changes every volume that did not name it.
    """

    values: Values
    required: bool = False
    default: Any = None
    shown_default: str | None = None

    def parse(self, text: str) -> Any:
        return self.values.parse(text)

    def describe(self, name: str) -> str:
        """The option as docs/storage.md's tables show it: ``chunk_size`` (64KiB; 512B-16MiB,
        a power of two), the default first unless the limits name it already (a choice)."""
        default = self.shown_default
        if default is None and self.default not in (None, ""):
            default = self.values.show(self.default)
        parts = [default] if default and default not in self.values.limits else []
        parts += [self.values.limits] if self.values.limits else []
        head = f"**`{name}`**" if self.required else f"`{name}`"
        return f"{head} ({'; '.join(parts)})" if parts else head


def power_of_two(low: int, high: int) -> Values:
    def parse(value: str) -> int:
        size = _parse_size(value)
        if size < low or size > high or size & (size - 1):
            raise ValueError(f"must be a power of two from {human(low)} to {human(high)}")
        return size

    return Values(parse, f"{human(low)}-{human(high)}, a power of two", human)


def size_up_to(high: int) -> Values:
    def parse(value: str) -> int:
        size = _parse_size(value)
        if size > high:
            raise ValueError(f"must be at most {human(high)}")
        return size

    return Values(parse, f"up to {human(high)}", human)


def _parse_size(value: str) -> int:
    try:
        return parse_size(value)
    except InvalidRequestError as err:
        raise ValueError(err.message) from None


def seconds(low: float, high: float, *, zero: bool = True) -> Values:
    """Seconds (``30``, ``1.5``, ``30s``): finite, from ``low`` (or more than 0 when
    ``zero`` is false) to ``high``."""

    def parse(value: str) -> float:
        text = value.strip().removesuffix("s")
        try:
            number = float(text) if len(text) <= 32 else math.nan
        except ValueError:
            number = math.nan  # refused below, as NaN and infinities are
        if not (low <= number <= high) or (not zero and number == 0):
            lowest = f"from {low:g}" if zero else f"more than {low:g} and"
            raise ValueError(f"must be seconds {lowest} up to {high:g} (e.g. 30, 1.5s)")
        return number

    return Values(parse, f"{'' if zero else '>'}{low:g}-{high:g} s", lambda v: f"{v:g} s")


def count(low: int, high: int) -> Values:
    def parse(value: str) -> int:
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 12) or not (
            low <= int(text) <= high
        ):
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(text)

    return Values(parse, f"{low}-{high}", str)


def _text(value: str) -> str:
    if not value or "\0" in value or len(value) > 4096:
        raise ValueError("must be a non-empty string of at most 4096 characters")
    return value


TEXT = Values(_text)


def choice(*allowed: str) -> Values:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be {' or '.join(allowed)}")
        return value

    return Values(parse, " or ".join(f"`{a}`" for a in allowed))


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise ValueError("must be true or false")
    return value.lower() in ("true", "yes", "1")


BOOLEAN = Values(_boolean, show=lambda value: f"`{str(value).lower()}`")


def human(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"
