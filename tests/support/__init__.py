"""Helpers the tests share."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


def eventually(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Calls `condition` until it returns something truthy, and returns that; fails once `timeout` seconds
    pass, with `what` (or the condition's name) and its last value. Exceptions it raises propagate."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or getattr(condition, '__name__', 'condition')} still {value!r} "
                                 f"after {timeout} s")
        time.sleep(interval)


async def eventually_async(condition: Callable[[], T | Awaitable[T]], timeout: float = 5.0,
                           interval: float = 0.01, what: str = "") -> T:
    """`eventually` for a test running on an event loop: `condition` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or getattr(condition, '__name__', 'condition')} still {value!r} "
                                 f"after {timeout} s")
        await asyncio.sleep(interval)


class Pending:
    """What a condition for `eventually` returns while it does not hold yet: falsy, and it carries what the
    condition saw, so a timeout's message shows the last state rather than `False`."""

    def __init__(self, seen: object) -> None:
        self.seen = seen

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"pending: {self.seen!r}"
