"""What the demo prints: one line per stage, everything else in a log file.

`Console` keeps a copy of the terminal's stdout and, unless verbose, points the process's own
file descriptors 1 and 2 at the log file. Redirecting the descriptors (not just `sys.stdout`)
is what catches all of it: Ray's worker and raylet lines (forwarded by the driver's log monitor),
MLflow's and transformers' warnings, C++ core-worker messages and the pipelines' own tables.
Each stage is one console line: on a terminal it is redrawn in place with the elapsed time every
few seconds; piped (CI, `| tee`), it is written once when the stage ends.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO, TypeVar

T = TypeVar("T")
REDRAW_S = 2.0


def _close_ray_bars() -> None:
    """Close the progress bars Ray's tqdm still draws on the driver. A worker's last `close` can
    race Ray's shutdown, and the driver redraws a bar it still holds on every later `print` (Ray
    patches print), on the terminal once the descriptors are restored. Ray has no public call for
    this: its manager's bar groups are reached directly."""
    try:
        from ray.experimental import tqdm_ray
    except ImportError:
        return
    manager = tqdm_ray._manager
    if manager is None:
        return
    with manager.lock:
        for group in manager.bar_groups.values():
            for bar in group.bars_by_uuid.values():
                bar.bar.close()
            group.bars_by_uuid.clear()


class Console:
    """Stage lines on the terminal, the rest of the process's output in `log_path`.

    verbosity: "quiet" (the final table only), "normal" (stage lines and the table), "verbose"
    (nothing redirected: every pipeline's own output too)."""

    def __init__(self, log_path: Path, verbosity: str = "normal") -> None:
        if verbosity not in ("quiet", "normal", "verbose"):
            raise ValueError(f"verbosity={verbosity!r}: one of quiet, normal, verbose")
        self.log_path, self.verbosity = log_path, verbosity
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self._saved: tuple[int, int] | None = None
        self.out: TextIO = sys.stdout

    def __enter__(self) -> Console:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.verbosity == "verbose":
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        logging.captureWarnings(True)  # warnings.warn -> logging -> the log file, never the console
        warnings.simplefilter("default")
        return self

    def __exit__(self, *exc) -> None:
        _close_ray_bars()
        sys.stdout.flush()
        sys.stderr.flush()
        if self._saved is not None:
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = None
            self.out.close()
            self.out = sys.stdout

    def say(self, text: str, *, always: bool = False) -> None:
        """A console line (also in the log); `always`: printed even when quiet."""
        if self.verbosity != "quiet" or always:
            print(text, file=self.out, flush=True)
        if self._saved is not None:
            print(text, flush=True)  # fd 1 is the log file

    def stage(self, i: int, n: int, name: str, budget_s: int, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run one stage under one console line: `[i/n] name ... elapsed / budget`."""
        head = f"[{i}/{n}] {name}"
        print(f"\n===== {head} (budget {budget_s} s) =====", flush=True)  # marks the stage in the log
        live = self.verbosity == "normal" and self.out.isatty()
        done = threading.Event()
        t = time.perf_counter()

        def redraw() -> None:
            while not done.wait(REDRAW_S):
                self.out.write(f"\r{head} ... {time.perf_counter() - t:.0f} s / {budget_s} s")
                self.out.flush()

        painter = threading.Thread(target=redraw, daemon=True) if live else None
        if painter:
            painter.start()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            done.set()
            self._end(head, t, budget_s, live, failed=True)
            raise
        done.set()
        if painter:
            painter.join()
        self.times[name] = self._end(head, t, budget_s, live)
        return result

    def reused(self, i: int, n: int, name: str, run_id: str) -> None:
        """The console line of a stage a resumed demo had finished before: not run again."""
        print(f"\n===== [{i}/{n}] {name}: reused =====", flush=True)
        self.say(f"[{i}/{n}] {name}: finished before the resume, run {run_id[:8]} reused")

    def _end(self, head: str, t: float, budget_s: int, live: bool, failed: bool = False) -> float:
        took = time.perf_counter() - t
        state = "FAILED" if failed else ("done" if took <= budget_s else f"over budget by {took - budget_s:.0f} s")
        line = f"{head}: {took:.0f} s of {budget_s} s, {state}"
        if live:
            self.out.write("\r" + " " * (len(head) + 24) + "\r")
        self.say(line, always=failed)
        return took

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
