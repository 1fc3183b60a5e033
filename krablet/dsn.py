"""Shard connection strings: where they come from, how they print, what a failure to connect means.

A password never sits in a printable object: ``Dsn`` wraps the string and its
``repr``/``str`` mask the password, so a config, a traceback's locals or a log
line show ``postgresql://krab:***@db1/jobs``. Only ``connect`` reveals it.

Passwords belong in the environment (``KRABLET_DSNS``), a DSN file
(``--dsn-file``, one DSN per line), or libpq's own places: a service file
(``PGSERVICEFILE``, DSN ``service=shard0``) or a passfile (``PGPASSFILE``,
default ``~/.pgpass``), not in ``--dsn``, whose value every user of the
machine sees in ``ps``.
"""

from __future__ import annotations

import re

import psycopg


def mask_dsn(dsn) -> str:
    """A DSN safe to print: the password (URL or keyword form) replaced by ***."""
    dsn = reveal(dsn)
    dsn = re.sub(r"(://[^:/@?]*:)[^@]+@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", dsn, flags=re.I)


class Dsn:
    """A connection string whose printed forms hide the password."""

    __slots__ = ("_value",)

    def __init__(self, value: str | Dsn):
        self._value = reveal(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Dsn({mask_dsn(self._value)!r})"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, Dsn) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def reveal(dsn: str | Dsn) -> str:
    return dsn.reveal() if isinstance(dsn, Dsn) else dsn


def has_password(dsn: str | Dsn) -> bool:
    try:
        return bool(psycopg.conninfo.conninfo_to_dict(reveal(dsn)).get("password"))
    except psycopg.ProgrammingError:
        return False


def read_dsn_file(path: str) -> list[str]:
    """One DSN per line; blank lines and lines starting with # are skipped."""
    dsns = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                psycopg.conninfo.conninfo_to_dict(line)
            except psycopg.ProgrammingError as e:
                raise ValueError(f"{path}:{n}: not a PostgreSQL connection string: {e}") from None
            dsns.append(line)
    if not dsns:
        raise ValueError(f"{path}: no DSN in the file")
    return dsns


# SQLSTATEs that a retry cannot fix: wrong password or role, no such database, no
# permission to connect. Matched on the message too: a failed connection carries the
# server's FATAL text but, before PostgreSQL 17's libpq, not always its code.
_PERMANENT_STATES = {"28000", "28P01", "3D000", "42501", "08004"}
_PERMANENT_TEXT = re.compile(
    r"password authentication failed|no password supplied|authentication failed|role \S+ does not exist"
    r"|database \S+ does not exist|pg_hba\.conf rejects|permission denied for database"
    r"|invalid connection option|invalid URI|missing \"=\"|SSL (?:is )?required|server does not support SSL",
    re.I)


def is_permanent(error: BaseException) -> bool:
    """True if connecting will keep failing however often it is retried (bad credentials, no database)."""
    if type(error) is psycopg.ProgrammingError:  # a malformed DSN (its subclasses are SQL errors)
        return True
    if getattr(error, "sqlstate", None) in _PERMANENT_STATES:
        return True
    return bool(_PERMANENT_TEXT.search(str(error)))


def reason(error: BaseException) -> str:
    """The server's (or libpq's) own words, on one line."""
    text = " ".join(str(error).split())
    if isinstance(error, psycopg.errors.UndefinedTable):
        text += " (the shard has no Krablet schema: run `python -m krablet init`)"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class PermanentConnectionError(RuntimeError):
    """A shard refused the connection for a reason that retrying will not fix."""
