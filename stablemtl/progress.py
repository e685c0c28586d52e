"""Progress bars that also report to the ``stablemtl run`` terminal.

Every long loop of the kit (a training's steps, an evaluation's images, the miniatures, the tiny
base's pretraining) makes its bar with :func:`bar`. In JupyterLab it is tqdm's notebook bar; in a
terminal tqdm's text bar. When the notebook runs under ``stablemtl run`` the kernel's output goes into
the executed notebook, not to the terminal, so ``run`` sets ``STABLEMTL_PROGRESS`` to a file and
every bar also appends its state to it as JSON lines (at most every ``INTERVAL`` seconds, and when it
closes); :class:`Relay`, in the ``run`` process, reads the file and draws the same bars on the
terminal, under papermill's bar of the stage: a training's step, loss, steps per second and time left,
an evaluation's images.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

ENV = "STABLEMTL_PROGRESS"
INTERVAL = 0.5  # seconds between two reports of one bar


def bar(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, reporting to ``$STABLEMTL_PROGRESS`` when it is set."""
    from tqdm.auto import tqdm

    target = os.environ.get(ENV)
    if not target or kwargs.get("disable"):
        return tqdm(iterable, **kwargs)
    return _reporting(tqdm)(iterable, report_to=target, **kwargs)


_CLASSES: dict = {}


def _reporting(base):
    """A subclass of the tqdm class ``base`` that appends its state to a file."""
    if base in _CLASSES:
        return _CLASSES[base]

    class Reporting(base):
        def __init__(self, *args, report_to: str, **kwargs):
            self._report_to, self._reported = report_to, 0.0
            super().__init__(*args, **kwargs)
            self._report(force=True)

        def update(self, n=1):
            out = super().update(n)
            self._report()
            return out

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            super().set_postfix(ordered_dict, refresh, **kwargs)
            self._report()

        def close(self):
            if not getattr(self, "_closed_report", True):
                self._report(force=True, closed=True)
            super().close()

        def _report(self, force: bool = False, closed: bool = False) -> None:
            now = time.monotonic()
            if not force and now - self._reported < INTERVAL:
                return
            self._reported, self._closed_report = now, closed
            event = {"id": f"{os.getpid()}-{id(self)}", "desc": self.desc, "n": self.n, "total": self.total,
                     "unit": self.unit, "postfix": self.postfix or "", "leave": bool(self.leave), "closed": closed}
            try:
                with open(self._report_to, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event) + "\n")
            except OSError:
                pass  # the terminal's copy of a bar is a convenience; the work goes on without it

    _CLASSES[base] = Reporting
    return Reporting


class Relay:
    """Draws on this terminal the bars that a notebook's kernel reports to ``path``.

    ``with Relay(path): ...`` reads the file every ``INTERVAL`` seconds in a thread; on leaving it reads
    what is left and closes the bars. tqdm puts each bar on the first free line under the open ones."""

    def __init__(self, path: Path, prefix: str = "  "):
        self.path, self.prefix = Path(path), prefix
        self.bars: dict = {}
        self._offset, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        for b in self.bars.values():
            b.close()
        self.bars.clear()

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.poll()

    def poll(self) -> None:
        """Apply the events written since the last call."""
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[:chunk.rfind("\n") + 1]  # a line being written is read next time
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                self.apply(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue

    def apply(self, event: dict) -> None:
        from tqdm import tqdm

        b = self.bars.get(event["id"])
        if b is None:
            if event["closed"] and not event["leave"]:
                return
            b = self.bars[event["id"]] = tqdm(
                total=event["total"], initial=event["n"], desc=self.prefix + event["desc"], unit=event["unit"],
                leave=event["leave"], dynamic_ncols=True)
        if event["total"] != b.total:
            b.total = event["total"]
        b.set_postfix_str(event["postfix"], refresh=False)
        b.update(event["n"] - b.n)
        if event["closed"]:
            b.close()
            del self.bars[event["id"]]
