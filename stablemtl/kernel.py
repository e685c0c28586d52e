"""A notebook's kernel under ``stablemtl run`` (``session``): its sockets, its progress bars on the
terminal, and Ctrl-C.

- Sockets: IPC in a private temporary folder on Linux and macOS, so no TCP port is opened and Jupyter
  prints no "running over TCP without encryption" warning; TCP elsewhere.
- Progress: the kernel's bars (``stablemtl.progress``) are appended to the file ``$STABLEMTL_PROGRESS``
  names, which a thread of the runner reads and draws under papermill's cell bar (``progress.Relay``).
- Ctrl-C: the kernel's process group is killed at once, and the session raises ``KeyboardInterrupt``
  once papermill has seen the kernel die (the runner then exits with 130). Left to papermill, the
  interrupt arrived inside its event loop, which shut the kernel down politely while the interrupted
  cell's reply was still on its way, and the kernel printed a ZMQError traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path

from stablemtl.progress import ENV, Relay


@contextlib.contextmanager
def session(progress: bool):
    """The kernel manager class papermill gets for one notebook (see the module's text); the temporary
    folder of its sockets and bars is removed afterwards."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum, Unicode

    kernels, interrupted = [], []

    class _Manager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            await super().start_kernel(**kw)
            kernels.append(self)
            if interrupted:
                kill(self)

        async def shutdown_kernel(self, now: bool = False, restart: bool = False):
            await super().shutdown_kernel(now=now or bool(interrupted), restart=restart)

    def on_interrupt() -> bool:
        """Kill the running kernel; False (so KeyboardInterrupt is raised at once) when there is none
        or on a second Ctrl-C."""
        interrupted.append(True)
        return len(interrupted) == 1 and sum(kill(k) for k in kernels) > 0

    quiet = logging.getLogger("papermill")  # its "Kernel died while waiting for execute reply"

    def unless_interrupted(record) -> bool:
        return not interrupted

    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="stablemtl-kernel-"))
        manager = _Manager
        if os.name == "posix":
            class _IpcKernelManager(_Manager):
                transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc")
                ip = Unicode(str(Path(folder) / "ipc"))

            manager = _IpcKernelManager
        if progress:
            path = Path(folder) / "bars.jsonl"
            path.touch()
            stack.enter_context(environment(ENV, str(path)))  # the kernel inherits this process's environment
            stack.enter_context(Relay(path))
        stack.enter_context(on_sigint(on_interrupt))
        quiet.addFilter(unless_interrupted)
        stack.callback(quiet.removeFilter, unless_interrupted)
        try:
            yield manager
        except Exception:
            if interrupted:
                raise KeyboardInterrupt from None
            raise


def kill(manager) -> bool:
    """SIGKILL a started kernel and its process group (its data-loader workers); False if it has none."""
    provisioner = getattr(manager, "provisioner", None)
    process = getattr(provisioner, "process", None)
    if process is None or process.poll() is not None:
        return False
    pgid = getattr(provisioner, "pgid", None)
    try:
        if pgid and hasattr(os, "killpg"):
            os.killpg(pgid, signal.SIGKILL)
        else:
            process.kill()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def environment(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def on_sigint(handle):
    """While inside, SIGINT calls ``handle()``; when that returns False, SIGINT does what it did before
    (by default raising KeyboardInterrupt). Only in the main thread, and not where SIGINT is ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def note(signum, frame):
        if not handle():
            (previous if callable(previous) else signal.default_int_handler)(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
