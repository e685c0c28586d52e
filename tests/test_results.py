"""The committed demo run: its tables and target check follow from its metrics.csv, and it meets the
demo's targets (both models beat the trivial baseline on every headline metric; multi-stream is not
worse than single-stream on average)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from stablemtl.evaluate import MODELS
from stablemtl.report import format_target_check, target_check, write_tables

DEMO = Path(__file__).resolve().parents[1] / "results" / "demo"


@pytest.fixture
def regenerated(tmp_path):
    if not (DEMO / "metrics.csv").is_file():
        pytest.fail(f"{DEMO}/metrics.csv is missing: the demo run's results are committed (stablemtl run)")
    shutil.copy(DEMO / "metrics.csv", tmp_path / "metrics.csv")
    return write_tables(tmp_path, run="demo"), tmp_path


def test_committed_tables_are_regenerated_exactly_from_the_committed_csv(regenerated):
    written, _ = regenerated
    committed = sorted(p.name for p in (DEMO / "tables").iterdir())
    assert committed == sorted(written)
    for name, path in written.items():
        assert path.read_text() == (DEMO / "tables" / name).read_text(), name


def test_committed_summary_follows_from_the_csv_and_the_targets_hold():
    with open(DEMO / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["run"] == "demo"]
    table, passed = target_check(rows)
    assert format_target_check(table, passed) in (DEMO / "summary.md").read_text()
    assert passed, format_target_check(table, passed)
    assert {r["model"] for r in rows} >= set(MODELS)


def test_committed_figures_exist():
    for name in ("training_curves.png", "qualitative.png"):
        assert (DEMO / "figures" / name).stat().st_size > 10_000, name
