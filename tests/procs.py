"""External processes in tests: when one fails, the test's failure shows what it wrote.

A bare ``capture_output=True`` with ``check=True`` raises CalledProcessError, whose message
holds the exit code only: a `ray start --head` that failed on a loaded machine showed nothing of
Ray's stderr. Everything here puts the output tail into the assertion message (or, for a
background process, prints its log at teardown, which pytest shows only for a failing test).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

TAIL = 4000  # characters of each stream shown: the end is where the error is


def output(p: subprocess.CompletedProcess) -> str:
    """The command, its exit code and the tails of its stdout and stderr, for an assertion message."""
    out, err = (s if isinstance(s, str) else (s or b"").decode(errors="replace") for s in (p.stdout, p.stderr))
    cmd = " ".join(map(str, p.args)) if isinstance(p.args, list | tuple) else str(p.args)
    return f"$ {cmd}\nexit code {p.returncode}\n--- stdout ---\n{out[-TAIL:]}\n--- stderr ---\n{err[-TAIL:]}"


def run(cmd: Sequence[str], *, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """subprocess.run capturing text output; with `check`, a non-zero exit fails the test showing it."""
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **kw)
    if check:
        assert p.returncode == 0, output(p)
    return p


@contextlib.contextmanager
def background(cmd: Sequence[str], log: Path, **kw) -> Iterator[subprocess.Popen]:
    """A Popen whose stdout and stderr go to `log`; the caller stops it. Its log tail is printed
    when the block ends (pytest shows printed output of failing tests only), so a server that died
    or never answered shows why."""
    with log.open("wb") as f:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, **kw)
    try:
        yield proc
    finally:
        text = log.read_text(errors="replace") if log.is_file() else ""
        print(f"--- {log.name} (exit code {proc.poll()}) ---\n{text[-TAIL:]}")


def cli(module: str, args: Sequence[str], env: dict[str, str], *, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` run from the repository root with its own local Ray (as a user's
    driver has; its Ray workers inherit `env`, which a test's in-process Ray would not give them)."""
    import sys

    env = {**os.environ, **env}
    env.pop("RAY_ADDRESS", None)
    root = Path(__file__).resolve().parents[1]
    return run([sys.executable, "-m", module, *args], check=check, cwd=root, env=env, timeout=600)


def killed_at(point: str, module: str, args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`cli(module, args)` SIGKILLed at a named fault point (`workers.runtime.faults`, e.g.
    'indexcache.step_saved:1'); the test fails, showing the output, unless the process died of that SIGKILL."""
    import signal

    p = cli(module, args, {**env, "CALIBRAY_FAULT": point}, check=False)
    assert p.returncode == -signal.SIGKILL, output(p)
    return p


@contextlib.contextmanager
def driver(cmd: Sequence[str], log: Path, **kw) -> Iterator[subprocess.Popen]:
    """``background`` for a driver that starts its own local Ray: when the block ends, the driver and
    every process under it (Ray's GCS, raylet and workers) are SIGKILLed, so a test that killed the
    driver leaves no Ray behind. Descendants are listed before any kill: an orphan loses the link."""
    import signal

    import psutil

    env = {**os.environ, **kw.pop("env", {})}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as a user's driver has
    with background(cmd, log, env=env, cwd=Path(__file__).resolve().parents[1], **kw) as proc:
        tree: dict[int, psutil.Process] = {}
        try:
            yield proc
        finally:
            with contextlib.suppress(psutil.Error):
                tree.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            for p in tree.values():
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)


def wait_for(ready: Callable[[], object], proc: subprocess.Popen, timeout_s: float, what: str):
    """Poll ``ready()`` every 0.2 s until it returns something truthy (returned); the test fails if
    ``proc`` ends first or ``timeout_s`` passes. How kill tests time a kill: on a file or a logged
    metric appearing, never on a sleep."""
    import time

    t0 = time.monotonic()
    while not (got := ready()):
        assert proc.poll() is None, f"the process ended (exit code {proc.returncode}) before {what}"
        assert time.monotonic() - t0 < timeout_s, f"no {what} within {timeout_s} s"
        time.sleep(0.2)
    return got
