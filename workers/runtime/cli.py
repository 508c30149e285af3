"""The command-line edge of every pipeline: bad input is one line and exit code 2, not a traceback.

    if __name__ == "__main__":
        cli.run(main)

Bad input is an error raised before the pipeline's first MLflow run starts (`tracking.start_run`):
every pipeline checks its arguments, files and model before any work, so an error there names
something the user gave. It prints ``<prog>: error: <message>`` on stderr and exits 2 (argparse's
own convention for bad arguments). An error after a run started is a failure of that run: the run
ends FAILED with what it logged and the traceback is shown. ``CALIBRAY_DEBUG=1`` shows the
traceback of bad input too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from workers.runtime import tracking

# What checks of user input raise: ValueError (ConfigError, HFModelError, CorpusError, ...,
# json and UnicodeDecodeError too) and OSError (missing or unreadable files, CheckpointError).
USER_ERRORS = (ValueError, OSError)


_WORK_STARTED = 0


def work_started() -> None:
    """Inputs are checked: an error from here on is the work's failure (traceback), not bad input.

    Pipelines get this from `tracking.start_run`; a benchmark that logs no run calls it once its
    arguments, files and model are loaded."""
    global _WORK_STARTED
    _WORK_STARTED += 1


def _started() -> int:
    return tracking.runs_started() + _WORK_STARTED


def run(main: Callable[..., object], argv: list[str] | None = None) -> object:
    """Call `main(argv)`; bad input (raised before any MLflow run started) -> one line, exit 2."""
    started = _started()
    try:
        return main(argv)
    except USER_ERRORS as e:
        if _started() != started or os.environ.get("CALIBRAY_DEBUG"):
            raise
        prog = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "calibray"
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
