"""Ids past what a column's integer type holds: they name no row.

Asked about one, the database fails instead of finding nothing (SQLite's driver cannot
bind an integer beyond 64 bits; PostgreSQL's INTEGER stops at 2**31 - 1, "integer out of
range"), and that would read as a storage failure. So each lookup by id asks
:func:`fits` first and answers as for any other id that names nothing.
"""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import BigInteger, SmallInteger, inspect
from sqlalchemy.orm import Session

Row = TypeVar("Row")

# Signed bits of each integer type on PostgreSQL, the narrower backend (SQLite: 64 for all).
_BITS = ((SmallInteger, 16), (BigInteger, 64))
_INTEGER_BITS = 32


def fits(column, value: int) -> bool:
    """Whether ``value`` lies in the range of ``column``'s integer type (e.g. ``models.Job.id``)."""
    bits = next((bits for kind, bits in _BITS if isinstance(column.type, kind)), _INTEGER_BITS)
    return -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)


def get(session: Session, model: type[Row], key: int) -> Row | None:
    """``session.get(model, key)``, or None for a key past the primary key's type."""
    return session.get(model, key) if fits(inspect(model).primary_key[0], key) else None
