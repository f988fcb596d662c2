"""Expected failures, and the exit status each one gives on the command line.

Code raises one of these with a message that names the file and says what to do; the CLIs
(`fastres`, `fastres-prep`) print it as `PROG: error: MESSAGE` and exit with its status. Anything
else is a bug and keeps its traceback (exit status 1).

    status  meaning
    0       done
    1       a bug: an unexpected exception, shown with its traceback
    2       bad input or usage: unknown setting or bad value, missing or damaged data or checkpoint
    3       the run diverged (non-finite loss); the last good checkpoint is kept
    4       output cannot be written (not a folder, read-only, disk full); the previous files are kept
    5       the run folder is in use by another running training
    130     interrupted (Ctrl-C); 143 for SIGTERM. The last checkpoint is kept and resumes
"""
from __future__ import annotations

import atexit
import gc
import signal
import sys

EXIT_BUG, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OUTPUT, EXIT_IN_USE = 1, 2, 3, 4, 5


class FastresError(Exception):
    """An expected failure: printed as one message, without a traceback."""
    exit_status = EXIT_BUG


class BadInput(FastresError, ValueError):
    """Usage, settings, or an input file that is missing, malformed or damaged."""
    exit_status = EXIT_BAD_INPUT


class Diverged(FastresError):
    exit_status = EXIT_DIVERGED


class OutputError(FastresError):
    """A file or folder that fastres must write cannot be written."""
    exit_status = EXIT_OUTPUT


class RunInUse(FastresError):
    exit_status = EXIT_IN_USE


class Interrupted(FastresError):
    """Stopped by a signal at a safe point; exit status 128 + the signal's number, as shells do."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_status = 128 + int(signum)


def describe_os_error(e: OSError) -> str:
    """'No space left on device' rather than '[Errno 28] No space left on device: ...'."""
    return e.strerror or str(e)


def cli_main(prog: str, body) -> int:
    """Run body() -> exit status; turn expected failures into one message and their status."""
    # At exit, the interpreter's last garbage collections over torch's and dynamo's objects take
    # 1-2 s of every command; frozen objects are skipped (everything is written and closed by then)
    atexit.register(gc.freeze)
    try:
        return body() or 0
    except FastresError as e:
        word = "interrupted" if isinstance(e, Interrupted) else "error"
        print(f"{prog}: {word}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (start-up, conversion, evaluation)
        print(f"{prog}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
