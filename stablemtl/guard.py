"""Nothing lost: safe names, ownership markers, run locks and worker processes that die with their parent.

- ``check_name``: a run, preset or model name becomes one folder name; separators, ``..``, absolute
  paths and odd characters are refused, so nothing is written outside the roots a preset names.
- ``claim``: every folder the kit writes (a procedural data root, a base folder,
  ``outputs/<run>/<kind>``, ``results/<run>``) carries ``.stablemtl`` (what wrote it). The kit writes into
  a folder only when it is new, empty, marked, or recognisably the kit's own earlier output (then it
  adopts it: writes the marker); a non-empty foreign folder is refused (``InputError``), ``--force``
  included.
- ``RunLock``: ``results/<run>/.stablemtl.lock`` holds the pid of the run using the folder; a live pid
  stops a second run, a dead one's lock is taken over with a note.
- ``die_with_parent``: the initializer of worker processes (data preparation pools, DataLoader
  workers), so that a SIGKILLed parent leaves no orphans.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import stablemtl

MARKER = ".stablemtl"
LOCK = ".stablemtl.lock"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class _Named:
    """An error whose message names the input and the fix: in a notebook (IPython, papermill) it shows
    as that one line, without the traceback of the kit's code."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class StageError(_Named, RuntimeError):
    """A stage's input is missing or unusable; the message says what and how to make it."""


class InputError(_Named, ValueError):
    """A bad input (a name, a parameter, a preset field, a folder the kit does not own, a busy run);
    the message names it, what is allowed and the fix. The command line exits with status 2."""


class DiskFullError(OSError):
    """A write that did not fit on its disk: the message names the file, what it needed and what was free."""


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def check_free_space(folder, needed: int, what: str) -> None:
    """Refuse, before writing, ``what`` (about ``needed`` bytes) into ``folder`` when its disk has less free."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(f"not enough disk space for {what} in {folder}: it needs about {_mib(needed)}, "
                            f"{_mib(free)} are free there; free some space (or move the folder: OUTPUT_DIR, "
                            f"RESULTS_DIR) and run the same command again")


def disk_full(path, written: int, what: str = "the file") -> DiskFullError:
    """The error for a write of ``path`` that ran out of space after ``written`` bytes (its partial file
    already removed by the caller)."""
    import shutil

    folder = Path(path).parent
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return DiskFullError(f"the disk is full: writing {what} {path} stopped after {_mib(written)} with "
                         f"{_mib(free)} free; the partial file was removed; free some space (or move the "
                         f"folder: OUTPUT_DIR, RESULTS_DIR) and run the same command again")


def exit_status(prog: str, call: Callable[[], int], bad_input: Callable[[BaseException], bool] | None = None,
                writable: str = "--out, or OUTPUT_DIR, RESULTS_DIR, DATA_DIR") -> int:
    """Run a command's ``call()`` and turn the kit's named failures into one line on stderr and an exit
    status, with no traceback: a bad input (``InputError``, ``StageError``, or what ``bad_input`` accepts)
    2; Ctrl-C 130; a folder that cannot be written 2 (``writable``: how to give the command another place);
    a full disk 1. Anything else is a bug: its traceback is shown."""
    def say(text: str) -> None:
        print(f"{prog}: {text}", file=sys.stderr)

    try:
        return call()
    except (InputError, StageError, ValueError) as err:
        if not isinstance(err, (InputError, StageError)) and not (bad_input and bad_input(err)):
            raise
        say(str(err))
        return 2
    except KeyboardInterrupt:
        say("interrupted; what was written stays (a training keeps its last checkpoint); run the command "
            "again to continue")
        return 130
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            say(_unwritable(err, writable))
            return 2
        if err.errno in (errno.ENOSPC, errno.EDQUOT) or isinstance(err, DiskFullError):
            say(str(err))
            return 1
        raise


def check_name(value, what: str, where: str = "") -> str:
    """``value`` when it is a safe folder name (letters, digits, ``_ . -``, not starting with ``.``/``-``,
    no ``..``); otherwise an ``InputError`` naming ``what`` and ``where`` it came from."""
    text = str(value)
    if not isinstance(value, str) or not _NAME.fullmatch(text) or ".." in text:
        raise InputError(f"{what} {value!r}{f' ({where})' if where else ''}: not a safe folder name; use letters, "
                         f"digits, '_', '.' and '-' (starting with a letter or digit, no '/', no '..', at most 100 "
                         f"characters): it names a folder under the kit's roots")
    return text


# --------------------------------------------------------------------------- markers

def marker(folder: Path) -> dict | None:
    """The folder's ``.stablemtl`` record, or ``None`` when it has none."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return {"kind": "unknown"}  # a damaged marker is still the kit's


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as written by the kit (``kind``: data, base, training, results)."""
    record = {"kind": kind, "written_by": f"stablemtl {stablemtl.__version__}", "pid": os.getpid(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (Path(folder) / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != MARKER]


def claim(folder, kind: str, recognise: Callable[[Path], bool] | None = None, log=print, create: bool = True) -> Path:
    """Make ``folder`` the kit's for writing ``kind`` outputs: create it or take it when empty, marked
    (with the same kind) or recognised by ``recognise`` as an earlier kit output (adopted: marked now);
    refuse a non-empty foreign folder with an ``InputError`` naming it and the fix. Returns the folder.
    ``create=False`` only checks (nothing is written): the runner's check before any stage starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder; the kit writes its {kind} there: move the file "
                         f"away or choose another folder")
    record = marker(folder) if folder.is_dir() else None
    if record is not None:
        if record.get("kind") not in (kind, "unknown"):
            raise InputError(f"{folder} holds the kit's {record.get('kind')} (its {MARKER} says so), not {kind}; "
                             f"refusing to write {kind} there: give the {kind} its own folder")
        return folder
    if folder.is_dir() and _visible(folder):
        if recognise is None or not recognise(folder):
            names = ", ".join(sorted(p.name for p in _visible(folder))[:5])
            raise InputError(f"{folder} is not empty ({names}...) and was not written by stablemtl (no {MARKER} "
                             f"file); refusing to write the {kind} there (--force does not change this). Fix: "
                             f"choose a new or empty folder (--root/--out, --run-name, or DATA_DIR, BASE_DIR, "
                             f"OUTPUT_DIR, RESULTS_DIR), or move those files away")
        if not create:
            return folder
        log(f"note: {folder} holds an earlier stablemtl {kind} without a {MARKER} marker; adopted it")
    if not create:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_marker(folder, kind)
    except OSError as err:  # a read-only disk or a protected folder
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise InputError(_unwritable(err, "DATA_DIR, BASE_DIR, OUTPUT_DIR, RESULTS_DIR")) from None
    return folder


def _unwritable(err: OSError, writable: str) -> str:
    return (f"cannot write {err.filename or 'a file'}: {err.strerror} (a read-only or protected folder); give the "
            f"command a writable place ({writable}) or fix the folder's permissions")


def is_own(folder) -> bool:
    """Whether ``folder`` carries the kit's marker (what may be replaced or deleted)."""
    return Path(folder).is_dir() and marker(folder) is not None


# --------------------------------------------------------------------------- run locks

def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


class RunLock:
    """``<folder>/.stablemtl.lock`` while a run uses ``folder``; a context manager.

    Acquiring fails with an ``InputError`` naming the holder's pid when it is alive (on this host); the
    lock of a dead pid is stale and taken over with a note (``log``)."""

    def __init__(self, folder, log=print):
        self.path, self.log, self.held = Path(folder) / LOCK, log, False

    def acquire(self) -> "RunLock":
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._stale_or_raise()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            return self
        raise InputError(f"could not take the lock {self.path}: it keeps reappearing (another run starting?)")

    def _stale_or_raise(self) -> None:
        try:
            held = json.loads(self.path.read_text())
            pid, host = int(held["pid"]), held.get("host")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            pid, host = None, None
        if pid is not None and (host not in (None, socket.gethostname()) or pid_alive(pid)):
            where = f" on {host}" if host != socket.gethostname() else ""
            raise InputError(f"{self.path.parent} is in use by another stablemtl run (pid {pid}{where}, started "
                             f"{held.get('started')}: {held.get('command', '')!r}); wait for it to finish or stop "
                             f"it (kill {pid}), or use another --run-name. If no such run exists, delete {self.path}")
        self.log(f"note: took over the stale lock {self.path} of pid {pid} (no longer running)")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- worker processes

def die_with_parent(parent: int | None = None) -> None:
    """Run in a worker process: end it when ``parent`` (default: the current parent) dies.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a daemon thread polls the parent pid. Either
    way, a parent that is already gone ends the worker at once."""
    parent = os.getppid() if parent is None else parent
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
                raise OSError(ctypes.get_errno(), "prctl")
        except (OSError, AttributeError):
            _watch_parent(parent)
    else:
        _watch_parent(parent)
    if not pid_alive(parent):  # the parent died before the signal was armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while pid_alive(parent):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="stablemtl-parent-watch", daemon=True).start()
