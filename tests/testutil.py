"""Small helpers shared by the tests (on sys.path through pytest's `pythonpath`)."""
from __future__ import annotations

import time
from typing import Callable


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, poll_s: float = 0.01) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; its last answer, as a bool."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())
