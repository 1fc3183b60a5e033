"""The registry of job kinds: a payload validator (run at submit) and a handler (run by workers).

    @kind("resize", validate=lambda p: require(p, width=int, height=int))
    def resize(payload, ctx): ...

A validator raises ``ValueError`` for a malformed payload; submit refuses the
whole batch before anything is written. A handler returns the job's result
(JSON: dicts, lists, strings, finite numbers, booleans, None) or raises to fail
the attempt; a result that is not JSON fails the attempt too.

A long handler should look at ``ctx.cancelled()`` (or call ``ctx.check()``)
between steps: it turns true when the worker's heartbeat finds that the lease
was lost (the job was reclaimed by another worker, or the shard moved it), so
the work is no longer this worker's and its result would be refused.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field as dataclass_field
from typing import Any


class LeaseLost(RuntimeError):
    """Raised by ``JobContext.check`` once the job is no longer this worker's."""


class LeaseFlag:
    """Whether one job's lease was lost: the job's id in a set the worker's heartbeat
    fills (one set per batch, so a claimed job costs no lock or Event of its own)."""

    __slots__ = ("_job_id", "_lost")

    def __init__(self, job_id: int = 0, lost: set[int] | None = None):
        self._job_id = job_id
        self._lost = set() if lost is None else lost

    def is_set(self) -> bool:
        return self._job_id in self._lost

    def set(self) -> None:
        self._lost.add(self._job_id)


@dataclass(frozen=True)
class JobContext:
    key: str
    attempt: int
    owner: str
    # Set by the worker's heartbeat when it finds the lease lost.
    lease_lost: LeaseFlag = dataclass_field(default_factory=LeaseFlag, repr=False, compare=False)

    def cancelled(self) -> bool:
        return self.lease_lost.is_set()

    def check(self) -> None:
        """Raise LeaseLost if the job is no longer this worker's: stop, the result would not count."""
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.key!r}: the lease was lost, another worker owns the job now")


@dataclass(frozen=True)
class Kind:
    name: str
    handler: Callable[[dict, JobContext], Any]
    validate: Callable[[dict], None]


REGISTRY: dict[str, Kind] = {}


def kind(name: str, validate: Callable[[dict], None] | None = None):
    """Decorator registering ``handler(payload, ctx)`` for job kind ``name``."""

    def register(handler):
        REGISTRY[name] = Kind(name, handler, validate or (lambda payload: None))
        return handler

    return register


def require(payload: dict, **fields: type | tuple[type, ...]) -> None:
    """Check that ``payload`` has each field with the given type."""
    for field, types in fields.items():
        types = types if isinstance(types, tuple) else (types,)
        names = " or ".join(t.__name__ for t in types)
        if field not in payload:
            raise ValueError(f"missing field {field!r} ({names})")
        value = payload[field]
        # bool is an int subclass in Python, but `true` is not a number of seconds.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"field {field!r} must be {names}, got {type(value).__name__}")


def validate_payload(kind_name: str, payload: Any) -> None:
    """Raise ``ValueError`` with a message naming the kind if the payload is malformed."""
    if kind_name not in REGISTRY:
        raise ValueError(f"unknown job kind {kind_name!r} (registered: {sorted(REGISTRY)})")
    if not isinstance(payload, dict):
        raise ValueError(f"{kind_name}: payload must be a JSON object, got {type(payload).__name__}")
    try:
        REGISTRY[kind_name].validate(payload)
    except ValueError as e:
        raise ValueError(f"{kind_name}: malformed payload {payload!r}: {e}") from None


def import_kinds(modules: list[str]) -> None:
    """Import user modules whose ``@kind`` decorators register more kinds."""
    for module in modules:
        importlib.import_module(module)


# -- built-in kinds ---------------------------------------------------------------


@kind("noop")
def noop(payload: dict, ctx: JobContext) -> dict:
    return {"owner": ctx.owner, "attempt": ctx.attempt}


def _validate_sleep(payload: dict) -> None:
    require(payload, seconds=(int, float))
    if payload["seconds"] < 0:
        raise ValueError("field 'seconds' must be >= 0")


@kind("sleep", validate=_validate_sleep)
def sleep(payload: dict, ctx: JobContext) -> dict:
    time.sleep(payload["seconds"])
    return {"owner": ctx.owner, "attempt": ctx.attempt}


@kind("fail", validate=lambda p: require(p, message=str))
def fail(payload: dict, ctx: JobContext) -> None:
    """Always raises: a poison job, for testing dead-lettering."""
    raise RuntimeError(payload["message"])
