"""Fault injection at named points: how the kill tests SIGKILL a process at an exact place.

    CALIBRAY_FAULT=indexcache.step_saved:2 python -m pipelines.indexcache ...   # killed after the 2nd hit

A kill timed by sleeping races the work it means to interrupt (a 4-layer search finishes in under a
second); a named point is hit at the same place on every run. The kill is a real SIGKILL of the
process (no atexit, no `finally`, no MLflow `end_run`), so what survives is what `kill -9` leaves.
With the variable unset a point costs one environment lookup.

A point inside a Ray actor needs `CALIBRAY_FAULT_ONCE=<file>` too: the actor Ray or the pool puts in
its place inherits the environment and would die at the same point again; with it, only the first
process to reach the point dies (it creates the file just before the kill).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CALIBRAY_FAULT"
ONCE_ENV = "CALIBRAY_FAULT_ONCE"
_hits: Counter[str] = Counter()


def parse(spec: str) -> tuple[str, int]:
    """'<point>[:<nth hit>]' -> (point, nth)."""
    name, _, nth = spec.partition(":")
    if not name or not (nth or "1").isdigit() or int(nth or "1") < 1:
        raise ValueError(f"{ENV}={spec!r}: expected <point>[:<nth hit, >= 1>]")
    return name, int(nth or "1")


def point(name: str) -> None:
    """SIGKILL this process if `CALIBRAY_FAULT` names this point and this is its nth hit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, nth = parse(spec)
    if want != name:
        return
    _hits[name] += 1
    if _hits[name] == nth and _first(os.environ.get(ONCE_ENV)):
        os.kill(os.getpid(), signal.SIGKILL)


def _first(marker: str | None) -> bool:
    """True unless `marker` names a file some process already created (atomically: O_EXCL)."""
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
