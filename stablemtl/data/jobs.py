"""Work spread over processes: the data package's worker pool, an ordered map over it, and the
resumable job runner of the preparations (``stablemtl.data.prepare``).

``ordered_map`` returns every result in the order of its job, whatever the number of
workers, so what a caller writes from the results does not depend on it (the procedural
miniatures, ``stablemtl.data.mini``, and the prepared datasets are the same bytes with one
worker or many). ``run_resumable`` records each finished job in a journal (one JSON line) and
a rerun skips the jobs whose inputs are unchanged (names, sizes, modification times) and whose
recorded outputs are all present.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from stablemtl.guard import die_with_parent
from stablemtl.progress import bar as progress_bar


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """The worker processes; each dies with this process (``guard.die_with_parent``): a SIGKILLed run
    leaves no orphans."""
    return ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))


def ordered_map(work: Callable, items: list, workers: int, chunksize: int = 1) -> Iterator:
    """``work(item)`` for every item, yielded in the items' order: in ``workers`` processes
    (``worker_pool``, ``chunksize`` items per task) when more than one, else in this process.
    A failure cancels the items not started yet."""
    if workers <= 1:
        for item in items:
            yield work(item)
        return
    with worker_pool(workers) as pool:
        try:
            yield from pool.map(work, items, chunksize=chunksize)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# --------------------------------------------------------------------------- the resumable runner

def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_journal(path: Path, config: str) -> dict[str, dict]:
    """Finished frames of a previous run with the same configuration (a torn last line is ignored)."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("config") == config and "key" in entry:
                done[entry["key"]] = entry["record"]
    return done


def _complete(out: Path, record: dict, inputs: str) -> bool:
    """A frame is done when its inputs are unchanged and every output it recorded is present."""
    return record.get("inputs") == inputs and all(
        (out / rel).is_file() and (out / rel).stat().st_size > 0 for rel in record["written"].values())


def _fingerprint(paths) -> str:
    """The inputs' names, sizes and modification times: a changed raw file makes its frame run again."""
    stats = []
    for path in paths:
        try:
            stat = os.stat(path)
            stats.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((str(path), None, None))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def run_resumable(jobs: list[tuple[str, dict]], work: Callable[[dict], dict], out: Path, config: dict, *,
                  journal: Path, summary: Path, workers: int | None, progress: bool, desc: str) -> dict[str, dict]:
    """Run ``work`` on every job not finished before (journal + outputs present); returns key -> record.

    ``jobs`` are ``(key, job)``; a job's ``inputs`` (paths) are fingerprinted and not passed to
    ``work``, which returns a record whose ``written`` maps kinds to paths relative to ``out``.
    ``journal`` is appended one line per finished job (under ``config``'s hash: another
    configuration starts afresh); ``summary``, the file that describes a finished run, is removed
    before any work. ``workers`` processes (default: every CPU), a progress bar named ``desc``.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary.unlink(missing_ok=True)  # a summary always describes a finished run
    digest = _config_hash(config)
    previous = _read_journal(journal, digest)
    inputs = {key: _fingerprint(job.get("inputs", ())) for key, job in jobs}
    records = {key: previous[key] for key, _ in jobs if key in previous and _complete(out, previous[key], inputs[key])}
    todo = [(key, {k: v for k, v in job.items() if k != "inputs"}) for key, job in jobs if key not in records]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = progress_bar(total=len(jobs), initial=len(records), desc=desc, unit="frame", disable=not progress, leave=False)
    try:
        with open(journal, "a") as log:
            for record, (key, _) in zip(ordered_map(work, [job for _, job in todo], workers), todo):
                records[key] = record = {**record, "inputs": inputs[key]}
                log.write(json.dumps({"config": digest, "key": key, "record": record}, sort_keys=True) + "\n")
                log.flush()
                bar.update()
    finally:
        bar.close()
    return {key: records[key] for key, _ in jobs}
