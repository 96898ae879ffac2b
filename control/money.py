"""Money as the control plane prints it: US dollars as a decimal string with a fixed number of places.

PostgreSQL's numerics come back with their column's scale or a sum's exponent, which `str()` renders as
`0E-9` or `1.5E+3`; a reader of JSON (or of a column of figures) should always see `0.000000`."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

PLACES = 6  # micro-dollars: finer than any price per million tokens, coarse enough to read
_QUANTUM = Decimal(1).scaleb(-PLACES)


def usd(value: Decimal | int | str) -> str:
    """`value` US dollars as a plain decimal string with exactly PLACES decimal places."""
    return f"{Decimal(value).quantize(_QUANTUM, rounding=ROUND_HALF_UP):f}"
