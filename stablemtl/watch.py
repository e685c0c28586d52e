"""Watching a child process tree while it runs, for ``stablemtl rehearse``: its peak memory (the kernel's
high-water mark of each process, and the largest sum over the tree), a watchdog that stops the tree before
the machine runs out of memory (instead of the OOM killer), and the disk a step wrote (``folder_bytes``).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil

GIB = 1024 ** 3


def process_tree(pid: int) -> list:
    """The process ``pid`` and all its descendants (``psutil.Process``; [] once it ended)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def high_water(proc) -> int:
    """A process's peak resident set in bytes (Linux ``VmHWM``), else its current one."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return proc.memory_info().rss
    except Exception:  # noqa: BLE001 - the process ended between the listing and the read
        return 0


class Watch:
    """Polls a child process tree while it runs: the peak resident set (the largest single process's
    high-water mark, and the largest sum over the tree seen), and stops the tree with a clear record when
    the machine's available memory falls below ``reserve`` bytes (instead of the OOM killer)."""

    def __init__(self, pid: int, reserve: int, interval: float = 0.2, on_poll=None):
        self.pid, self.reserve, self.interval, self.on_poll = pid, reserve, interval, on_poll
        self.peak_process = self.peak_tree = 0
        self.killed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stablemtl-rehearse-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = process_tree(self.pid)
            if procs:
                marks = [high_water(p) for p in procs]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_process = max(self.peak_process, *marks)
                self.peak_tree = max(self.peak_tree, rss)
                available = psutil.virtual_memory().available
                if available < self.reserve and self.killed is None:
                    self.killed = (f"stopped by the rehearsal's memory watchdog: the machine had "
                                   f"{available / GIB:.2f} GiB available (reserve {self.reserve / GIB:.2f} GiB) "
                                   f"while this stage's processes held {rss / GIB:.2f} GiB")
                    for p in reversed(procs):
                        try:
                            p.send_signal(signal.SIGKILL)
                        except psutil.Error:
                            pass
            if self.on_poll is not None:
                self.on_poll()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def memory_reserve() -> int:
    """What the watchdog keeps free: 3 % of the machine's memory, at least 0.75 GiB."""
    return max(int(0.75 * GIB), int(0.03 * psutil.virtual_memory().total))


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):  # links are not followed: a checked dataset is counted once
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
