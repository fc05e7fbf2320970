"""Small file helpers: atomic writes, so a killed process never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Callable, Iterable


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporaries (".<name>.<12 hex digits>.tmp"),
    which only a write killed half-way leaves behind."""
    return re.fullmatch(r"\..+\.[0-9a-f]{12}\.tmp", name) is not None


def _create_temp(folder: Path, name: str) -> Path:
    """A new empty file beside the target, with the mode ``open(path, "w")`` would give it.

    Not ``tempfile.mkstemp``: it creates files 0600, so every run file (config, metrics,
    checkpoints, weights, report) would be private whatever the user's umask says. Creating
    it with 0666 lets the kernel apply the umask, as ``open()`` does; reading the umask
    instead (``os.umask`` sets it to read it) would race with other threads creating files.
    """
    # the name cut to fit the 255 bytes a file name may have with the 18 added: a valid name of
    # 240-255 characters failed with "File name too long"
    short = name.encode("utf-8")[:200].decode("utf-8", "ignore")
    while True:
        tmp = folder / f".{short}.{secrets.token_hex(6)}.tmp"  # (is_temporary knows it by this form)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # a name another writer took: draw again
            continue


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same folder, so the rename is atomic).

    The file ends up with the mode ``open()`` would give it: 0666 less the umask, or, when it
    replaces a file, that file's mode (a metrics.json made private stays private). An OSError
    names ``path``, not the hidden temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _create_temp(path.parent, path.name)
    except OSError as err:  # a read-only folder, a full disk
        raise type(err)(err.errno, err.strerror, str(path)) from None
    wanted = stat.S_IMODE(os.stat(path).st_mode) if path.is_file() else stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        try:
            write(tmp)
        except OSError as err:
            if err.filename is None or Path(err.filename) != tmp:
                raise
            raise type(err)(err.errno, err.strerror, str(path)) from None
        # some writers replace the file with one of their own: safetensors' save_file (0.8)
        # writes a new 0600 file over it; give it back the mode open() gives
        if stat.S_IMODE(os.stat(tmp).st_mode) != wanted:
            os.chmod(tmp, wanted)
        try:
            os.replace(tmp, path)
        except OSError as err:  # e.g. the target is a folder: name it, not the hidden temporary file
            raise type(err)(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Text files are UTF-8 whatever the locale; a file name that is not UTF-8 (a zip made on Windows,
# Latin-1 bytes: Python's str holds them as surrogates) is written with backslash escapes, e.g.
# "test/a/\udcff.png", where strict UTF-8 raised at the end of a training.
TEXT = dict(encoding="utf-8", errors="backslashreplace")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, **TEXT))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def check_output_file(name: str, flag: str, inputs: Iterable[str] = ()) -> Path:
    """The file a user asked a command to write (``flag`` FILE), checked before the command's
    work rather than after it: not a folder, in a folder that exists (none is made for it), and
    not one of the ``inputs`` it reads."""
    from cifarlens.errors import CifarlensError

    if not name:
        raise CifarlensError(f"{flag} is empty; give a file name")
    path = Path(name)
    if path.is_dir():
        raise CifarlensError(f"{flag} {name} is a folder; name a file in it")
    if not path.parent.is_dir():
        raise CifarlensError(f"{flag} {name}: no folder {path.parent}")
    if path.exists() and any(Path(item).exists() and os.path.samefile(path, item) for item in inputs):
        raise CifarlensError(f"{flag} {name} is one of the files it reads; name another file")
    return path


def write_output_text(path: Path, text: str) -> None:
    """Write a file the user named (see :func:`check_output_file`): atomically for a regular file,
    where a link leads (the link stays); straight into anything else, such as /dev/null, /dev/stdout
    or a named pipe (a rename would replace the device itself)."""
    path = Path(path)
    if path.exists() and not path.resolve().is_file():
        with path.open("w", **TEXT) as f:
            f.write(text)
        return
    atomic_write_text(path.resolve(), text)


# tables that tell an SQLite file's store (Optuna's schema since 1.x, MLflow's since 1.0)
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})
MLFLOW_TABLES = frozenset({"experiments", "runs", "metrics"})


def check_sqlite_store(path: Path, shown: str, *, needs: frozenset[str], kind: str,
                       other: dict[str, frozenset[str]]) -> None:
    """One-line errors before a library opens the SQLite file ``path`` as its store: a folder, a
    folder it cannot write in, or a file that is not an SQLite database or holds another store's
    tables (``needs`` are this store's; ``other``: {what: tables} of the usual mix-ups). Optuna
    and MLflow both add their tables to any SQLite file they are given, then fail on the
    mix. An empty file (or a database without tables) is new: fine; a missing one must be one this
    process could make (a file beside it is made and removed; an MLflow run resumed must still find its
    store gone)."""
    from cifarlens.errors import CifarlensError

    if path.is_dir():
        raise CifarlensError(f"{shown}: {path} is a folder, not a file")
    folder = path.parent if str(path.parent) else Path(".")
    if not os.access(folder, os.W_OK | os.X_OK):  # SQLite writes a journal beside the file
        raise CifarlensError(f"{shown}: the folder {folder} is not writable")
    if not path.exists():
        try:  # a file of another name: the store's own name may be opened meanwhile by another worker
            _create_temp(folder, path.name).unlink()
        except OSError as err:  # /proc, a read-only file system (root passes os.access)
            raise CifarlensError(f"{shown}: cannot create {path} ({err.strerror})") from None
        return
    if path.stat().st_size == 0:
        return
    tables = _tables(path, shown)
    if tables and not needs <= tables and time.time() - path.stat().st_mtime < 10:
        # another worker's library may be making them this moment (two workers started together
        # on a new study): what a just-written file holds is read again before it is refused
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not needs <= tables:
            time.sleep(0.2)
            tables = _tables(path, shown)
    if tables and not needs <= tables:
        what = next((name for name, marks in other.items() if marks <= tables), "another program's")
        raise CifarlensError(f"{shown}: {path} holds {what} tables ({', '.join(sorted(tables)[:4])}, ...), not "
                             f"{kind}'s; choose another file")


def _tables(path: Path, shown: str) -> set[str]:
    """The names of the tables in the SQLite file ``path``."""
    import sqlite3

    from cifarlens.errors import CifarlensError

    try:
        with contextlib.closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)) as db:
            return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:  # "file is not a database"
        raise CifarlensError(f"{shown}: {path} is not an SQLite database ({err}); choose another file") from None


def stdout_to_devnull() -> None:
    """After a BrokenPipeError on stdout (``cifarlens ... | head``: the reader left): point it at
    /dev/null, so that later prints and the flush at exit write nowhere instead of failing again."""
    import sys

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
