"""Studies and where they live: storages (SQLite, Optuna journal, database servers), the study
with its saved search space and base config, the pruner, and the epoch budget.

A study lives in an Optuna storage: a SQLite file (the default, ``OUT/study.db``), an
Optuna journal file (``journal:PATH``) or a PostgreSQL/MySQL URL that workers on many
machines share. Beside a local storage, a file lock (:class:`FileLock`) serialises the
claiming of trials between local workers. The search space and the base config are saved
in the study when it is created; a worker with a different one is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import optuna

from cifarlens.config import RunConfig, to_dict
from cifarlens.errors import CifarlensError
from cifarlens.io import MLFLOW_TABLES, OPTUNA_TABLES, check_sqlite_store
from cifarlens.tune.space import MACHINE_KEYS, SearchSpace

PRUNERS = ("median", "hyperband", "none")
SPACE_ATTR, BASE_ATTR, DATA_ATTR = "cifarlens.space", "cifarlens.base_config", "cifarlens.data_fingerprints"
SQLITE_TIMEOUT_S = 60  # how long a writer waits for another process's SQLite lock
CONNECT_TIMEOUT_S = 10  # database servers: fail quickly when unreachable
HEARTBEAT_S, GRACE_S = 30, 120  # a RUNNING trial without a heartbeat for GRACE_S is failed


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


@dataclass
class Storage:
    url: str  # as given to --storage (workers are started with it)
    display: str  # for messages: the URL with any password hidden
    optuna: Any  # an optuna.storages.BaseStorage
    lock_path: Path | None  # a local file lock for claiming trials; None for database servers

    def lock(self) -> FileLock:
        return FileLock(self.lock_path)


class FileLock:
    """An exclusive ``fcntl`` lock on a file, released explicitly or on exit (no-op without a path)."""

    def __init__(self, path: Path | None):
        self._file = None
        if path is not None:
            self._file = open(path, "a")  # noqa: SIM115  (held until release())
            fcntl.flock(self._file, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# driver module -> the pip package that provides it
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pymysql": "PyMySQL",
                   "MySQLdb": "mysqlclient", "pg8000": "pg8000"}


def open_storage(url: str) -> Storage:
    """Open (creating if needed) the storage at ``url``: ``sqlite:///FILE``, ``journal:FILE`` or
    a SQLAlchemy database URL (``postgresql://USER:PASS@HOST/DB``, ``mysql+pymysql://...``).
    Any failure is one :class:`CifarlensError` line, within about ``CONNECT_TIMEOUT_S``. A file's
    relative path is made absolute (tune.json keeps it, and its hint must hold from any folder)."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    for scheme in ("journal:", "sqlite:///"):
        name = url.removeprefix(scheme)
        if url.startswith(scheme) and name not in ("", ":memory:") and not name.startswith(("/", "file:")):
            url = scheme + str(Path(name).absolute())
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        _require_folder(path, url)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        try:
            storage = JournalStorage(JournalFileBackend(str(path)))
        except (OSError, ValueError) as err:
            raise CifarlensError(f"cannot open storage {url}: {err}") from None
        return Storage(url, url, storage, _lock_path(path))
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise CifarlensError(f"storage {url!r} is not a URL; use sqlite:///FILE.db, journal:FILE, "
                             "or postgresql://USER:PASS@HOST/DB for workers on several machines") from None
    display = parsed.render_as_string(hide_password=True)
    engine_kwargs: dict[str, Any] = {}
    lock_path = None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise CifarlensError(f"storage {display} is an in-memory SQLite database, which other processes "
                                 "cannot share and which is lost at exit; give a file: sqlite:///FILE.db")
        path = Path(parsed.database)
        _require_folder(path, display)
        check_sqlite_store(path, f"storage {display}", needs=OPTUNA_TABLES, kind="Optuna",
                           other={"MLflow's": MLFLOW_TABLES})
        with contextlib.suppress(OSError):  # made as open() makes files (0666 less the umask): SQLite's own is 0644
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        lock_path = _lock_path(path)
    else:
        try:
            driver = parsed.get_driver_name()  # loads SQLAlchemy's dialect for the URL
        except sqlalchemy.exc.NoSuchModuleError:
            raise CifarlensError(f"storage {display}: unknown database type {parsed.drivername!r}; use "
                                 "sqlite:///FILE.db, journal:FILE, postgresql://... or mysql+pymysql://...") from None
        engine_kwargs["connect_args"] = _connect_timeout(driver)
    try:
        storage = _rdb_storage(url, engine_kwargs, lock_path)
    except ImportError as err:
        module = getattr(err.__cause__, "name", None) or str(err)
        package = DRIVER_PACKAGES.get(module, module)
        raise CifarlensError(f"storage {display} needs the database driver {module!r}, which is not installed "
                             f"(pip install {package})") from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise CifarlensError(f"cannot open storage {display}: {reason}") from None
    except RuntimeError as err:  # e.g. a table schema from another Optuna version
        raise CifarlensError(f"cannot use storage {display}: {str(err).splitlines()[0]}") from None
    return Storage(url, display, storage, lock_path)


def _rdb_storage(url: str, engine_kwargs: dict, lock_path: Path | None):
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        # Creating the tables is not safe against a second process doing the same: local
        # workers take the file lock; on a database server, one retry covers the race.
        for attempt in range(2):
            try:
                with FileLock(lock_path):
                    return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                      grace_period=GRACE_S)
            except Exception as err:
                if attempt or lock_path is not None or "already exists" not in str(err):
                    raise
                time.sleep(1.0)


def _require_folder(path: Path, url: str) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CifarlensError(f"storage {url}: folder {folder} does not exist; create it or choose another path")
    if path.is_dir():
        raise CifarlensError(f"storage {url}: {path} is a folder, not a file")


def _lock_path(path: Path) -> Path:
    # not PATH.lock: Optuna's journal storage uses that name for its own lock
    return path.with_name(path.name + ".tune-lock")


def _connect_timeout(driver: str) -> dict:
    if driver in ("psycopg2", "psycopg", "pymysql", "mysqldb"):
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    if driver == "pg8000":
        return {"timeout": CONNECT_TIMEOUT_S}
    return {}


# ---------------------------------------------------------------------------
# Study
# ---------------------------------------------------------------------------


def base_identity(cfg: RunConfig) -> dict:
    """The base config as flat {dotted key: value}, without the keys that may differ per machine."""
    flat = {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()}
    return json.loads(json.dumps({k: v for k, v in flat.items() if k not in MACHINE_KEYS}))


def open_study(storage: Storage, name: str, space: SearchSpace, base_cfg: RunConfig,
               data: dict[str, str] | None = None) -> optuna.Study:
    """Create study ``name`` (maximising validation accuracy) or load it; a study created with
    another search space or base config, or (``data``: the base config's data fingerprints) on
    other images, is refused."""
    space_dict = json.loads(json.dumps(space.to_dict()))
    base = base_identity(base_cfg)
    with storage.lock():
        verbosity = optuna.logging.get_verbosity()
        # not Optuna's "Using an existing study ..." line: a refusal below may follow it, and tune
        # says itself what it continues
        optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
        try:
            study = optuna.create_study(study_name=name, storage=storage.optuna, direction="maximize",
                                        load_if_exists=True)
        except Exception as err:  # SQLAlchemy/driver errors surface here for servers that went away
            import sqlalchemy.exc

            # Optuna wraps a failed commit (a read-only database file) in its StorageInternalError
            cause = err.__cause__ if isinstance(err, optuna.exceptions.StorageInternalError) else err
            if not isinstance(cause, sqlalchemy.exc.SQLAlchemyError):
                raise
            why = str(getattr(cause, "orig", None) or cause).splitlines()[0]  # "attempt to write a readonly database"
            raise CifarlensError(f"cannot use storage {storage.display}: {why}") from None
        finally:
            optuna.logging.set_verbosity(verbosity)
        if len(study.directions) > 1:  # study.direction raised a RuntimeError
            raise CifarlensError(f"study {name} in {storage.display} has {len(study.directions)} objectives; cifarlens "
                                 "studies have one (validation accuracy); use another --study name, or another --storage")
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise CifarlensError(f"study {name} in {storage.display} minimises; cifarlens studies maximise "
                                 "validation accuracy; use another --study name, or another --storage")
        attrs = study.user_attrs
        if SPACE_ATTR not in attrs:
            if study.trials:
                raise CifarlensError(f"study {name} in {storage.display} was not created by cifarlens tune; "
                                     "use another --out (or --study name in a shared --storage)")
            study.set_user_attr(SPACE_ATTR, space_dict)
            study.set_user_attr(BASE_ATTR, base)
            if data is not None:
                study.set_user_attr(DATA_ATTR, data)
            return study
    if attrs[SPACE_ATTR] != space_dict:
        old, new = attrs[SPACE_ATTR], space_dict
        differs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise CifarlensError(f"study {name} in {storage.display} was created with a different search space "
                             f"(differs in: {', '.join(differs)}); use another --out (or --study name in a shared "
                             "--storage), or the same --space")
    # (a study stored by an older cifarlens may hold machine keys that it did not yet ignore)
    old = {k: v for k, v in (attrs.get(BASE_ATTR) or {}).items() if k not in MACHINE_KEYS}
    if old != base:
        differs = sorted(k for k in set(old) | set(base) if old.get(k) != base.get(k))
        raise CifarlensError(f"study {name} in {storage.display} was created with a different base config "
                             f"(differs in: {', '.join(differs)}); use another --out (or --study name in a shared "
                             "--storage), or the same --config and flags")
    if data is not None and attrs.get(DATA_ATTR, data) != data:  # data.data_dir may differ: not what it holds
        raise CifarlensError(f"study {name} in {storage.display} was run on other images than "
                             f"{base_cfg.data.data_dir} holds now; use another --study name (or --out) for this "
                             "data, or point --data-dir at the data of its trials")
    if data is not None and DATA_ATTR not in attrs:  # a study of an older cifarlens
        study.set_user_attr(DATA_ATTR, data)
    return study


def make_pruner(name: str, *, startup: int, min_epochs: int, epochs: int | None):
    """``median``: prune a trial whose best validation accuracy so far is below the median of the
    completed trials at the same epoch, once ``startup`` trials completed and from epoch
    ``min_epochs`` on; ``hyperband``: successive halving brackets between ``min_epochs`` and
    ``epochs``; ``none``: every trial runs to the end."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=min_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=epochs or "auto")
    if name == "none":
        return optuna.pruners.NopPruner()
    raise CifarlensError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")


def pin_budget(cfg: RunConfig) -> RunConfig:
    """Fix ``train.epochs`` from the base recipe, so a sampled recipe cannot change the budget."""
    from cifarlens.recipes import RECIPES

    if cfg.train.epochs is not None:
        return cfg
    return replace(cfg, train=replace(cfg.train, epochs=RECIPES.get(cfg.train.recipe)["epochs"]))


def default_study_name(cfg: RunConfig) -> str:
    return f"{cfg.data.dataset}-{cfg.model.name}"


# ---------------------------------------------------------------------------
# Workers that are gone
# ---------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Whether the worker process ``pid`` on this machine still runs (this process, between trials: no)."""
    if pid == os.getpid():
        return False  # this worker runs one trial at a time, and is between trials here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a worker this process started stays a zombie until it is waited for: dead all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (macOS): os.kill's answer
        return True


def mark_interrupted(run_dir: str | None) -> None:
    """A dead worker's trial folder says "interrupted" (its run.json was left at "running")."""
    from cifarlens.runs import RunDir

    if run_dir and (Path(run_dir) / "run.json").is_file():
        with contextlib.suppress(CifarlensError, OSError):
            run = RunDir(run_dir)
            if run.meta().get("status") == "running":
                run.write_meta(status="interrupted")
