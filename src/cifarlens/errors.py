"""User-facing errors.

Anything a user can cause (a missing dataset, a bad flag value, a corrupt
checkpoint, an unreadable image) raises :class:`CifarlensError` with a one-line
message that names the problem and the fix. The CLI prints it without a
traceback; programming errors are left to propagate as usual.
"""

import errno
import os
import signal
import warnings
from pathlib import Path

# OS errors that come from the user's machine or paths, not from a bug (a read-only or full disk,
# a file where a folder was meant, a path that cannot hold a file, such as /proc/x): the CLI prints them in one line
USER_OS_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                            errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT})


def user_os_error(err: OSError) -> str | None:
    """"Permission denied: PATH" for an OS error of :data:`USER_OS_ERRORS`; None for any other
    (a bug, left to its traceback)."""
    if err.errno not in USER_OS_ERRORS:
        return None
    return str(err.strerror) + (f": {err.filename}" if err.filename else "")


class CifarlensError(Exception):
    """An error caused by the user's input, with a message meant for them."""


class NotThisDataset(CifarlensError):
    """Data that is not the named dataset (other class folders where CIFAR-10's are expected).
    ``problem`` says what was found; ``hint`` how to read it, which depends on who asks: ``train``
    offers ``--dataset imagefolder``, a command on a run names the run's dataset instead
    (:meth:`with_hint`)."""

    def __init__(self, problem: str, hint: str):
        super().__init__(f"{problem} ({hint})")
        self.problem, self.hint = problem, hint

    def with_hint(self, hint: str) -> "NotThisDataset":
        return NotThisDataset(self.problem, hint)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's time limit) or SIGHUP (a closed terminal) while the
    CLI runs: handled as Ctrl-C is, so a training run is marked interrupted and can be resumed."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = int(signum)

    @staticmethod
    def raise_it(signum, frame):  # the SIGTERM (and SIGHUP) handler
        raise Terminated(signum)


_PACKAGE = str(Path(__file__).resolve().parent)
_python_format = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` for the CLI: cifarlens's own warnings as one line for the user
    ("cifarlens: warning: ..."), not Python's two (file, line and the source line that warned);
    the warnings of other libraries as Python formats them."""
    if str(Path(filename).resolve()).startswith(_PACKAGE + os.sep):
        return f"cifarlens: warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)
