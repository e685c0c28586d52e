"""The result files of an evaluation, read and written without torch.

In ``results/<run>/`` (``stablemtl.evaluate`` writes them, ``stablemtl.report`` makes tables from them):

- ``metrics.csv``: tidy, one row per (model, seed, benchmark, metric): run, model, seed, benchmark,
  dataset, task, metric, value, higher_is_better, n_images;
- ``per_sample.csv``: one row per (model, seed, benchmark, image, metric);
- ``results.sha256.json``: the sha256 of both CSVs as evaluate wrote them, so that a table made from a
  hand-edited CSV says so (``edited_results``);
- ``predictions/<model>/seed<seed>/<benchmark>/<NNNNN>.npz`` (``predictions/<model>/<benchmark>/`` for
  the seed-independent rows): the cached predictions (``prediction_folder``).

``seed`` is the training seed of the model evaluated, empty for the seed-independent rows (``trivial``,
``vae_ceiling``). CSVs written before the kit had the column (header without ``seed``) are read with an
empty seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

from stablemtl.data.formats import FormatError, read_json_if_present, set_aside_corrupt, write_bytes
from stablemtl.paths import METRICS_FILE, SAMPLES_FILE

HASH_FILE = "results.sha256.json"  # {csv name: sha256 of the file as evaluate wrote it}
# {"model|seed|benchmark": images predicted (not read from the cache) and their seconds, device, peak memory}
TIMING_FILE = "evaluate_timing.json"
METRIC_FIELDS = ("run", "model", "seed", "benchmark", "dataset", "task", "metric", "value", "higher_is_better",
                 "n_images")
SAMPLE_FIELDS = ("run", "model", "seed", "benchmark", "index", "id", "metric", "value")


class ResultsFileError(ValueError):
    """A results CSV exists but cannot be read as one (wrong header, a value that is not a number)."""


class CsvRows:
    """One results CSV: ``path`` and its header ``fields``."""

    def __init__(self, path: Path, fields):
        self.path, self.fields = path, fields

    def read(self) -> list[dict]:
        """The rows (keys in the order of ``fields``); a ``ResultsFileError`` naming the file, the line and
        the value when it is not one of the kit's CSVs (other header) or a ``value`` is not a number. A file
        of the header before the ``seed`` column is read with an empty seed: its rows stay valid."""
        if not self.path.is_file():
            return []
        before_seed = [f for f in self.fields if f != "seed"]
        try:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or list(reader.fieldnames) not in (list(self.fields), before_seed):
                    raise ResultsFileError(f"{self.path}: expected the header {','.join(self.fields)} (or the same "
                                           f"without seed), got {','.join(reader.fieldnames or ['(empty file)'])}")
                rows, header = list(reader), reader.fieldnames
        except (csv.Error, UnicodeDecodeError) as err:
            raise ResultsFileError(f"{self.path}: not a readable CSV ({err})") from None
        for line, row in enumerate(rows, 2):
            if None in row or any(v is None for v in row.values()):
                raise ResultsFileError(f"{self.path}: line {line} has {len(row) - (None in row)} field(s) and "
                                       f"{len(row.get(None) or [])} extra; expected {len(header)}")
            try:
                float(row["value"])
            except ValueError:
                raise ResultsFileError(f"{self.path}: line {line}: value {row['value']!r} is not a number "
                                       f"(write nan for a missing one)") from None
        return [{f: row.get(f, "") for f in self.fields} for row in rows]

    def write(self, rows: list[dict]) -> str:
        """Write the rows atomically; returns the file's sha256."""
        tmp = self.path.with_suffix(".csv.partial")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)
        return file_sha256(self.path)


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def results_hashes(results_dir) -> dict[str, str]:
    """``{csv name: sha256}`` as evaluate recorded them in ``results.sha256.json`` (``{}`` when absent,
    e.g. results written before the kit recorded hashes; a corrupt record is named)."""
    return read_json_if_present(Path(results_dir) / HASH_FILE)


def edited_results(results_dir, names=(METRICS_FILE, SAMPLES_FILE)) -> list[str]:
    """One message per results CSV of ``results_dir`` whose sha256 differs from the one evaluate
    recorded: edited by hand (or by another tool) since it was written. Files without a record pass."""
    results_dir = Path(results_dir)
    try:
        recorded, found = results_hashes(results_dir), []
    except FormatError as err:
        return [f"{err}: the results cannot be checked against the hashes evaluate recorded"]
    for name in names:
        path = results_dir / name
        if name in recorded and path.is_file() and file_sha256(path) != recorded[name]:
            found.append(f"{path} was changed after evaluate wrote it (its sha256 differs from the one recorded "
                         f"in {results_dir / HASH_FILE}): the numbers below come from the edited file")
    return found


def value_text(v) -> str:
    """A metric value as the CSVs hold it: ``repr`` of the float, ``nan`` for a missing one."""
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def read_or_set_aside(table: CsvRows) -> list[dict]:
    """The rows of a results CSV evaluate merges into; one that cannot be read is set aside with a message
    (its rows are recomputed when their models are evaluated again) instead of failing every rerun."""
    try:
        return table.read()
    except ResultsFileError as err:
        set_aside_corrupt(table.path, str(err).removeprefix(f"{table.path}: "))
        return []


def write_hashes(out_dir: Path, hashes: dict[str, str]) -> None:
    """Record the sha256 of the CSVs as written (``HASH_FILE``)."""
    write_bytes(out_dir / HASH_FILE, (json.dumps(hashes, indent=1, sort_keys=True) + "\n").encode())


def set_aside_stale_rows(out_dir, run: str, expected: dict[str, set[str]], log=print) -> int:
    """Move the rows of ``run`` whose model is a key of ``expected`` but whose seed is not in its set (a
    seed this evaluation does not train, or rows written before the seed column) out of both CSVs, into
    ``<name>.set_aside.csv`` next to them (appended: nothing is lost; put them back by hand to use them);
    the CSVs and their hashes are rewritten. Returns the number of metric rows moved."""
    out_dir = Path(out_dir)
    stale = lambda r: r["run"] == run and r["model"] in expected and r["seed"] not in expected[r["model"]]  # noqa: E731
    tables = [CsvRows(out_dir / METRICS_FILE, METRIC_FIELDS), CsvRows(out_dir / SAMPLES_FILE, SAMPLE_FIELDS)]
    rows = [read_or_set_aside(t) for t in tables]
    moved = sorted({(r["model"], r["seed"] or "none") for r in rows[0] if stale(r)})
    if not moved:
        return 0
    for table, table_rows in zip(tables, rows):
        aside = CsvRows(table.path.with_suffix(".set_aside.csv"), table.fields)
        aside.write(read_or_set_aside(aside) + [r for r in table_rows if stale(r)])
    log(f"note: {out_dir / METRICS_FILE}: the rows of " + ", ".join(f"{m} (seed {s})" for m, s in moved)
        + f" of run {run!r} are not part of this evaluation (no such model and seed); moved to "
        + f"{(out_dir / METRICS_FILE).with_suffix('.set_aside.csv').name} and "
        + f"{(out_dir / SAMPLES_FILE).with_suffix('.set_aside.csv').name}")
    hashes = {t.path.name: t.write([r for r in table_rows if not stale(r)]) for t, table_rows in zip(tables, rows)}
    write_hashes(out_dir, hashes)
    return sum(stale(r) for r in rows[0])


def seed_text(seed) -> str:
    """The ``seed`` column's text of a training seed: ``""`` for None (a seed-independent row)."""
    if seed is None or seed == "":
        return ""
    if not isinstance(seed, bool) and isinstance(seed, (int, np.integer, str)) and re.fullmatch(r"-?\d+", str(seed)):
        return str(int(seed))
    raise ValueError(f"seed {seed!r} is not an integer (or None for a seed-independent row)")


def prediction_folder(results_dir, model: str) -> tuple[Path, str]:
    """The folder of ``model``'s cached predictions that readers show, holding ``<benchmark>/NNNNN.npz``,
    and its seed: the first (lowest) seed's ``predictions/<model>/seed<seed>`` when the model was
    evaluated with seeds, else ``predictions/<model>`` and ``""``."""
    folder = Path(results_dir) / "predictions" / model
    seeds = sorted(int(p.name[4:]) for p in folder.glob("seed*") if p.is_dir() and re.fullmatch(r"seed-?\d+", p.name))
    return (folder / f"seed{seeds[0]}", str(seeds[0])) if seeds else (folder, "")


def read_metrics(results_dir) -> list[dict]:
    """The rows of ``<results_dir>/metrics.csv``; a clear error when there is none or it cannot be read
    (``ResultsFileError`` naming the file, the line and the value)."""
    path = Path(results_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics in this results folder (run stablemtl.evaluate.evaluate first)")
    return CsvRows(path, METRIC_FIELDS).read()
